//! TLS 1.3 with mandatory client certificates, shared by gRPC and QUIC. The verifier
//! chains the certificate to the fleet CA (expiry and CRL included) and then requires
//! exactly one SPIFFE URI SAN in the configured trust domain, so a certificate that
//! names no device is refused during the handshake, before any application byte.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;

use crate::identity::{identity_from_cert, DeviceIdentity, IdentityError};

/// Where the server's certificate and the fleet trust anchors live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// PEM bundle of fleet CAs; device certificates must chain to one of them.
    pub client_ca: PathBuf,
    /// SPIFFE trust domain device identities must belong to.
    pub trust_domain: String,
    /// Optional PEM CRL file of revoked device certificates; re-read when it changes,
    /// and open connections of newly revoked certificates are closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    /// Fleets with a CA of their own (fleet id -> PEM file). Such a CA may only issue
    /// that fleet's devices, and that fleet's devices must come from it. Fleets not
    /// listed use `client_ca` (a shared CA; the fleet is whatever the SAN names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fleet_cas: BTreeMap<String, PathBuf>,
    /// How often the CRL file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub crl_reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            server_cert: "pki/server.pem".into(),
            server_key: "pki/server.key".into(),
            client_ca: "pki/ca.pem".into(),
            trust_domain: "fleetgate.local".into(),
            crl: None,
            fleet_cas: BTreeMap::new(),
            crl_reload_interval: Duration::from_secs(2),
        }
    }
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    #[error("{0}: no PEM private key found")]
    NoKey(PathBuf),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls.fleet_cas: {0}")]
    FleetCa(String),
    #[error("{path}: not a valid CRL: {detail}")]
    BadCrl { path: PathBuf, detail: String },
}

/// Client-certificate verifier: WebPKI chain validation plus the SPIFFE identity rule.
/// The WebPKI part is swapped whole when the CRL changes, so a handshake always sees
/// one consistent revocation list.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    fleet_cas: FleetCas,
}

/// Which fleet each dedicated CA serves, by the CA's subject name (DER).
#[derive(Debug, Default)]
pub struct FleetCas {
    by_subject: HashMap<Vec<u8>, String>,
    by_fleet: HashMap<String, Vec<u8>>,
}

impl FleetCas {
    /// Enforces the binding for a chain webpki already verified: the name of the CA
    /// the chain ends at (the issuer of its top certificate) must be the fleet's own
    /// CA if it has one, and a fleet CA may not vouch for another fleet.
    pub fn check(
        &self,
        fleet: &str,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), IdentityError> {
        if self.by_fleet.is_empty() {
            return Ok(());
        }
        let top = intermediates.last().unwrap_or(end_entity);
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(top)
            .map_err(|_| IdentityError::Unparseable)?;
        let anchor = cert.issuer().as_raw();
        let mismatch = |detail| IdentityError::FleetCaMismatch {
            fleet: fleet.to_owned(),
            detail,
        };
        match (self.by_fleet.get(fleet), self.by_subject.get(anchor)) {
            (Some(own), _) if own.as_slice() != anchor => Err(mismatch("issued by another CA")),
            (None, Some(_)) => Err(mismatch("a fleet CA issued another fleet's device")),
            _ => Ok(()),
        }
    }
}

impl SpiffeClientVerifier {
    pub fn new(
        roots: RootCertStore,
        crls: Vec<CertificateRevocationListDer<'static>>,
        trust_domain: &str,
        fleet_cas: FleetCas,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let inner = webpki_verifier(&roots, &provider, crls)?;
        Ok(Self {
            inner: RwLock::new(inner),
            roots,
            trust_domain: trust_domain.to_owned(),
            provider,
            fleet_cas,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Replaces the revocation list; handshakes from now on are checked against it.
    pub fn set_crls(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<(), TlsError> {
        let next = webpki_verifier(&self.roots, &self.provider, crls)?;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn webpki_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    Ok(
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls)
            // Revocation is about device certificates; a fleet CA without a CRL
            // configured must not lock out its devices.
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()?,
    )
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional (RFC 8446 4.2.4); sending none avoids a lock-held borrow.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .current()
            .verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |e: IdentityError| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        };
        let id = identity_from_cert(end_entity, &self.trust_domain).map_err(refuse)?;
        self.fleet_cas
            .check(id.fleet_id.as_str(), end_entity, intermediates)
            .map_err(refuse)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Loaded TLS material: one verifier, from which per-transport configs are made.
pub struct ServerTls {
    pub verifier: Arc<SpiffeClientVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ServerTls {
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let chain = load_certs(&cfg.server_cert)?;
        let key = load_key(&cfg.server_key)?;
        let mut roots = RootCertStore::empty();
        let mut shared_subjects = HashSet::new();
        for ca in load_certs(&cfg.client_ca)? {
            shared_subjects.insert(subject_of(&ca)?);
            roots.add(ca)?;
        }
        let mut fleet_cas = FleetCas::default();
        for (fleet, path) in &cfg.fleet_cas {
            crate::identity::FleetId::parse(fleet)
                .map_err(|_| TlsError::FleetCa(format!("{fleet:?} is not a valid fleet id")))?;
            for ca in load_certs(path)? {
                let subject = subject_of(&ca)?;
                // Chains are told apart by the anchor's name: names must be unique.
                if shared_subjects.contains(&subject) || fleet_cas.by_subject.contains_key(&subject)
                {
                    return Err(TlsError::FleetCa(format!(
                        "{}: CA name is not unique among the trusted CAs",
                        path.display()
                    )));
                }
                fleet_cas.by_subject.insert(subject.clone(), fleet.clone());
                fleet_cas.by_fleet.insert(fleet.clone(), subject);
                roots.add(ca)?;
            }
        }
        let crls = match &cfg.crl {
            Some(path) => load_crls(path)?,
            None => Vec::new(),
        };
        let verifier = Arc::new(SpiffeClientVerifier::new(
            roots,
            crls,
            &cfg.trust_domain,
            fleet_cas,
        )?);
        Ok(Self {
            verifier,
            chain,
            key,
        })
    }

    /// A TLS 1.3-only server config advertising `alpn`. Early data stays disabled
    /// (rustls' default): 0-RTT data is replayable.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.verifier.clone())
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.max_early_data_size = 0;
        Ok(Arc::new(config))
    }

    pub fn trust_domain(&self) -> &str {
        self.verifier.trust_domain()
    }

    /// The server certificate's notAfter (Unix seconds), for the expiry alert.
    pub fn server_not_after(&self) -> Option<i64> {
        let leaf = self.chain.first()?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
        Some(cert.validity().not_after.timestamp())
    }
}

/// Identity of an established connection from its verified peer chain.
pub fn peer_identity(
    peer_certs: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Result<DeviceIdentity, IdentityError> {
    let leaf = peer_certs
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoSpiffeId)?;
    identity_from_cert(leaf, trust_domain)
}

/// Stable metric label for a failed handshake.
pub fn refusal_label(err: &io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => "aborted",
            _ => "io_error",
        };
    };
    tls_refusal_label(tls)
}

pub fn tls_refusal_label(err: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match err {
        E::NoCertificatesPresented => "no_client_cert",
        E::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "cert_expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "cert_not_yet_valid"
            }
            CertificateError::UnknownIssuer => "cert_unknown_issuer",
            CertificateError::Revoked => "cert_revoked",
            CertificateError::Other(o) => {
                o.0.downcast_ref::<IdentityError>()
                    .map(IdentityError::as_str)
                    .unwrap_or("cert_invalid")
            }
            _ => "cert_invalid",
        },
        E::NoApplicationProtocol => "alpn_mismatch",
        E::PeerIncompatible(_) => "incompatible",
        _ => "tls_error",
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Io {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Io {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(path.to_owned()))
}

fn subject_of(ca: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(ca)
        .map_err(|e| TlsError::FleetCa(format!("unparseable CA certificate: {e}")))?;
    Ok(cert.subject().as_raw().to_vec())
}

/// Serials (lowercase hex, no leading zero bytes, as in `DeviceIdentity`) revoked by
/// `crls`; a list that does not parse is an error, never an empty set.
pub fn revoked_serials(
    path: &Path,
    crls: &[CertificateRevocationListDer<'_>],
) -> Result<HashSet<String>, TlsError> {
    let mut serials = HashSet::new();
    for der in crls {
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| TlsError::BadCrl {
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
        for revoked in crl.iter_revoked_certificates() {
            let raw = revoked.raw_serial();
            let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
            serials.insert(hex::encode(&raw[first..]));
        }
    }
    Ok(serials)
}

pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::crls(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Io {
            path: path.to_owned(),
            source,
        })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}
