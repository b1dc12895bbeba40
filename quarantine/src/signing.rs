//! Operator signatures on quarantine decisions. Producers to `fleet.quarantine.v1` are
//! already restricted by Kafka ACLs; the signature makes an operator's record
//! attributable to one person's key afterwards, whoever could write to the topic.
//!
//! The signature is ECDSA P-256 SHA-256 (ASN.1 DER) over the protobuf encoding of the
//! decision with `signer_cert_der` (11) and `signature` (12) empty. A decision verifies
//! when its certificate chains to the fleet CA with clientAuth, carries exactly one URI
//! SAN `spiffe://<trust-domain>/operator/<name>`, `decided_by` is `operator:<name>`, and
//! the signature matches. Fields unknown to this build are dropped on re-encoding, so a
//! record written by a newer schema does not verify here (fails closed).

use std::time::Duration;

use fleetgate_proto::QuarantineDecision;
use prost::Message as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// `decided_by` prefix of decisions made by a person.
pub const OPERATOR_PREFIX: &str = "operator:";

/// The bytes a decision's signature covers: its encoding with fields 11 and 12 empty.
pub fn signed_bytes(d: &QuarantineDecision) -> Vec<u8> {
    let mut unsigned = d.clone();
    unsigned.signer_cert_der.clear();
    unsigned.signature.clear();
    unsigned.encode_to_vec()
}

/// An operator named by a certificate's `spiffe://<trust-domain>/operator/<name>` SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorId {
    pub trust_domain: String,
    pub name: String,
}

impl OperatorId {
    /// `operator:<name>`, the `decided_by` value of this operator's decisions.
    pub fn decided_by(&self) -> String {
        format!("{OPERATOR_PREFIX}{}", self.name)
    }

    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}/operator/{}", self.trust_domain, self.name)
    }
}

/// Why a certificate does not name an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotOperator {
    #[error("certificate is malformed: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN")]
    NoUri,
    #[error("certificate has {0} URI SANs; an operator certificate has exactly one")]
    AmbiguousUri(usize),
    #[error("URI SAN {0:?} is not spiffe://<trust-domain>/operator/<name>")]
    NotOperatorUri(String),
}

fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parses `spiffe://<trust-domain>/operator/<name>`.
pub fn parse_operator_uri(uri: &str) -> Result<OperatorId, NotOperator> {
    let bad = || NotOperator::NotOperatorUri(uri.to_owned());
    let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
    let (trust_domain, path) = rest.split_once('/').ok_or_else(bad)?;
    let name = path.strip_prefix("operator/").ok_or_else(bad)?;
    if !valid_component(trust_domain) || !valid_component(name) {
        return Err(bad());
    }
    Ok(OperatorId {
        trust_domain: trust_domain.to_owned(),
        name: name.to_owned(),
    })
}

/// The operator a DER certificate names (its SAN only; trust is checked by [`verify`]).
pub fn operator_of(cert_der: &[u8]) -> Result<OperatorId, NotOperator> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| NotOperator::Malformed(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| NotOperator::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(NotOperator::NoUri),
        [uri] => parse_operator_uri(uri),
        many => Err(NotOperator::AmbiguousUri(many.len())),
    }
}

/// Why a credential cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no CERTIFICATE block in the certificate PEM")]
    NoCertificate,
    #[error("no PRIVATE KEY block in the key PEM")]
    NoKey,
    #[error("reading PEM: {0}")]
    Pem(#[source] std::io::Error),
    #[error("private key is not a PKCS#8 ECDSA P-256 key: {0}")]
    UnsupportedKey(String),
    #[error("private key does not belong to the certificate")]
    KeyMismatch,
    #[error("not an operator certificate: {0}")]
    NotOperator(#[from] NotOperator),
    #[error("ECDSA signing failed")]
    Signing,
}

/// An operator's certificate and private key, ready to sign decisions.
pub struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    operator: OperatorId,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("operator", &self.operator)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the first certificate of `cert_pem` and the PKCS#8 key of `key_pem`.
    /// Refuses certificates that do not name an operator and keys that do not match.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, SignError> {
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or(SignError::NoCertificate)?
            .map_err(SignError::Pem)?
            .to_vec();
        let operator = operator_of(&cert_der)?;
        let pkcs8 = match rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(SignError::Pem)?
            .ok_or(SignError::NoKey)?
        {
            PrivateKeyDer::Pkcs8(k) => k,
            _ => return Err(SignError::UnsupportedKey("not PKCS#8".into())),
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| SignError::UnsupportedKey(e.to_string()))?;
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| NotOperator::Malformed(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(SignError::KeyMismatch);
        }
        Ok(Self {
            key,
            cert_der,
            operator,
            rng,
        })
    }

    /// The operator the certificate names (not yet verified against a CA).
    pub fn operator(&self) -> &OperatorId {
        &self.operator
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
}

/// Returns `decision` carrying `signer`'s certificate and signature.
pub fn sign(
    mut decision: QuarantineDecision,
    signer: &Signer,
) -> Result<QuarantineDecision, SignError> {
    let signature = signer
        .key
        .sign(&signer.rng, &signed_bytes(&decision))
        .map_err(|_| SignError::Signing)?;
    decision.signer_cert_der = signer.cert_der.clone();
    decision.signature = signature.as_ref().to_vec();
    Ok(decision)
}

/// Who signed a decision that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerIdentity {
    pub operator: OperatorId,
    /// Serial number of the signer certificate, lowercase hex.
    pub cert_serial_hex: String,
    /// SHA-256 of the signer certificate's DER, lowercase hex.
    pub cert_sha256_hex: String,
}

/// Why a decision's signature is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("decision is not signed")]
    Unsigned,
    #[error("CA certificate PEM: {0}")]
    CaPem(String),
    #[error("signer certificate is malformed: {0:?}")]
    BadCertificate(webpki::Error),
    #[error("signer certificate is not trusted (CA, validity or clientAuth): {0:?}")]
    Untrusted(webpki::Error),
    #[error("signer is not an operator: {0}")]
    NotOperator(#[from] NotOperator),
    #[error("decided_by {decided_by:?} is not the signer {signer:?}")]
    DecidedByMismatch { decided_by: String, signer: String },
    #[error("signature does not match the decision (altered after signing?)")]
    BadSignature,
}

/// Trust anchors to verify decisions against: the fleet CA(s) that issue operator
/// certificates.
#[derive(Debug, Clone)]
pub struct Verifier {
    anchors: Vec<TrustAnchor<'static>>,
}

/// Certificate signature algorithms accepted on the chain (the dev CA uses P-256).
static CHAIN_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
];

impl Verifier {
    /// Trusts every certificate in `ca_pem`.
    pub fn from_ca_pem(ca_pem: &str) -> Result<Self, VerifyError> {
        let mut anchors = Vec::new();
        for der in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            let der = der.map_err(|e| VerifyError::CaPem(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| VerifyError::CaPem(format!("{e:?}")))?;
            anchors.push(anchor.to_owned());
        }
        if anchors.is_empty() {
            return Err(VerifyError::CaPem("no CERTIFICATE block".into()));
        }
        Ok(Self { anchors })
    }

    /// Verifies `d` with certificate validity checked at `at_ms` (Unix milliseconds).
    pub fn verify(
        &self,
        d: &QuarantineDecision,
        at_ms: i64,
    ) -> Result<SignerIdentity, VerifyError> {
        if d.signer_cert_der.is_empty() || d.signature.is_empty() {
            return Err(VerifyError::Unsigned);
        }
        let der = CertificateDer::from(d.signer_cert_der.as_slice());
        let cert = webpki::EndEntityCert::try_from(&der).map_err(VerifyError::BadCertificate)?;
        let at = UnixTime::since_unix_epoch(Duration::from_millis(at_ms.max(0) as u64));
        cert.verify_for_usage(
            CHAIN_ALGS,
            &self.anchors,
            &[],
            at,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(VerifyError::Untrusted)?;
        let operator = operator_of(&d.signer_cert_der)?;
        if d.decided_by != operator.decided_by() {
            return Err(VerifyError::DecidedByMismatch {
                decided_by: d.decided_by.clone(),
                signer: operator.decided_by(),
            });
        }
        cert.verify_signature(
            webpki::ring::ECDSA_P256_SHA256,
            &signed_bytes(d),
            &d.signature,
        )
        .map_err(|_| VerifyError::BadSignature)?;
        let serial = X509Certificate::from_der(&d.signer_cert_der)
            .map(|(_, c)| hex::encode(c.raw_serial()))
            .unwrap_or_default();
        Ok(SignerIdentity {
            operator,
            cert_serial_hex: serial,
            cert_sha256_hex: hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                &d.signer_cert_der,
            )),
        })
    }
}

/// [`Verifier::verify`] against the CA certificate(s) in `ca_pem`.
pub fn verify(
    d: &QuarantineDecision,
    ca_pem: &str,
    at_ms: i64,
) -> Result<SignerIdentity, VerifyError> {
    Verifier::from_ca_pem(ca_pem)?.verify(d, at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_pki::{DevCa, DeviceCertSpec, Issued, OperatorCertSpec};
    use fleetgate_proto::{Finding, QuarantineState};

    const TD: &str = "fleetgate.test";

    fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    fn decision(decided_by: &str) -> QuarantineDecision {
        QuarantineDecision {
            fleet_id: "f1".into(),
            device_id: "car-7".into(),
            state: QuarantineState::Quarantined as i32,
            reason: "impossible travel".into(),
            evidence: vec![Finding {
                detector: "impossible_travel".into(),
                score: 0.9,
                ..Default::default()
            }],
            decided_by: decided_by.into(),
            decided_at_ms: now_ms(),
            decision_id: "abc".into(),
            ..Default::default()
        }
    }

    fn operator(ca: &DevCa, name: &str) -> (Issued, Signer) {
        let issued = ca.issue_operator(&OperatorCertSpec::new(TD, name)).unwrap();
        let signer = Signer::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        (issued, signer)
    }

    #[test]
    fn valid_signature_verifies_and_names_the_operator() {
        let ca = DevCa::generate("ca").unwrap();
        let (issued, signer) = operator(&ca, "alice");
        assert_eq!(signer.operator().decided_by(), "operator:alice");
        let signed = sign(decision("operator:alice"), &signer).unwrap();
        let who = verify(&signed, &ca.cert_pem(), now_ms()).unwrap();
        assert_eq!(who.operator.name, "alice");
        assert_eq!(who.operator.trust_domain, TD);
        assert_eq!(
            who.operator.spiffe_id(),
            "spiffe://fleetgate.test/operator/alice"
        );
        assert_eq!(who.cert_serial_hex, issued.serial_hex);
        assert_eq!(who.cert_sha256_hex.len(), 64);
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let ca = DevCa::generate("ca").unwrap();
        let (_, signer) = operator(&ca, "alice");
        let signed = sign(decision("operator:alice"), &signer).unwrap();
        let tampers: [fn(&mut QuarantineDecision); 5] = [
            |d| d.reason.push('!'),
            |d| d.state = QuarantineState::Released as i32,
            |d| d.expires_at_ms = 1,
            |d| d.evidence.clear(),
            |d| d.device_id = "car-8".into(),
        ];
        for tamper in tampers {
            let mut d = signed.clone();
            tamper(&mut d);
            let err = verify(&d, &ca.cert_pem(), now_ms()).unwrap_err();
            assert!(matches!(err, VerifyError::BadSignature), "{err}");
        }
    }

    #[test]
    fn unsigned_decision_is_refused() {
        let ca = DevCa::generate("ca").unwrap();
        let err = verify(&decision("operator:alice"), &ca.cert_pem(), now_ms()).unwrap_err();
        assert!(matches!(err, VerifyError::Unsigned));
    }

    #[test]
    fn device_certificate_is_not_an_operator() {
        let ca = DevCa::generate("ca").unwrap();
        let device = ca.issue_device(&DeviceCertSpec::new(TD, "x", "y")).unwrap();
        let err = Signer::from_pem(&device.cert_pem, &device.key_pem).unwrap_err();
        assert!(
            matches!(err, SignError::NotOperator(NotOperator::NotOperatorUri(ref u)) if u == "spiffe://fleetgate.test/fleet/x/device/y"),
            "{err}"
        );
        // A record carrying a device certificate and a valid signature by its key is
        // still refused: the signer is not an operator.
        let mut d = decision("operator:y");
        d.signer_cert_der = rustls_pemfile::certs(&mut device.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        let pkcs8 = match rustls_pemfile::private_key(&mut device.key_pem.as_bytes())
            .unwrap()
            .unwrap()
        {
            PrivateKeyDer::Pkcs8(k) => k,
            _ => unreachable!("rcgen writes PKCS#8"),
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .unwrap();
        d.signature = key.sign(&rng, &signed_bytes(&d)).unwrap().as_ref().to_vec();
        let err = verify(&d, &ca.cert_pem(), now_ms()).unwrap_err();
        assert!(matches!(err, VerifyError::NotOperator(_)), "{err}");
    }

    #[test]
    fn certificate_from_another_ca_is_refused() {
        let ca = DevCa::generate("ca").unwrap();
        let rogue = DevCa::generate("rogue").unwrap();
        let (_, signer) = operator(&rogue, "alice");
        let signed = sign(decision("operator:alice"), &signer).unwrap();
        let err = verify(&signed, &ca.cert_pem(), now_ms()).unwrap_err();
        assert!(matches!(err, VerifyError::Untrusted(_)), "{err}");
        assert!(verify(&signed, &rogue.cert_pem(), now_ms()).is_ok());
    }

    #[test]
    fn expired_operator_certificate_is_refused_now_but_valid_then() {
        let ca = DevCa::generate("ca").unwrap();
        let issued = ca
            .issue_operator(&OperatorCertSpec::new(TD, "alice").expired())
            .unwrap();
        let signer = Signer::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        let signed = sign(decision("operator:alice"), &signer).unwrap();
        let err = verify(&signed, &ca.cert_pem(), now_ms()).unwrap_err();
        assert!(matches!(err, VerifyError::Untrusted(_)), "{err}");
        let two_days_ago = now_ms() - 2 * 86_400_000;
        assert!(verify(&signed, &ca.cert_pem(), two_days_ago).is_ok());
    }

    #[test]
    fn decided_by_must_name_the_signer() {
        let ca = DevCa::generate("ca").unwrap();
        let (_, signer) = operator(&ca, "alice");
        for claimed in ["operator:bob", "processor:p1", ""] {
            let signed = sign(decision(claimed), &signer).unwrap();
            let err = verify(&signed, &ca.cert_pem(), now_ms()).unwrap_err();
            assert!(
                matches!(err, VerifyError::DecidedByMismatch { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let ca = DevCa::generate("ca").unwrap();
        let alice = ca
            .issue_operator(&OperatorCertSpec::new(TD, "alice"))
            .unwrap();
        let bob = ca
            .issue_operator(&OperatorCertSpec::new(TD, "bob"))
            .unwrap();
        let err = Signer::from_pem(&alice.cert_pem, &bob.key_pem).unwrap_err();
        assert!(matches!(err, SignError::KeyMismatch), "{err}");
        let err = Signer::from_pem(&alice.key_pem, &alice.key_pem).unwrap_err();
        assert!(matches!(err, SignError::NoCertificate), "{err}");
        let err = Signer::from_pem(&alice.cert_pem, &alice.cert_pem).unwrap_err();
        assert!(matches!(err, SignError::NoKey), "{err}");
        assert!(matches!(
            Verifier::from_ca_pem("nothing here"),
            Err(VerifyError::CaPem(_))
        ));
    }

    #[test]
    fn operator_uri_parsing() {
        assert_eq!(
            parse_operator_uri("spiffe://td/operator/alice").unwrap(),
            OperatorId {
                trust_domain: "td".into(),
                name: "alice".into()
            }
        );
        for bad in [
            "spiffe://td/operator/",
            "spiffe://td/operator/a/b",
            "spiffe://td/fleet/f/device/d",
            "https://td/operator/alice",
            "spiffe:///operator/alice",
            "spiffe://td",
        ] {
            assert!(parse_operator_uri(bad).is_err(), "{bad}");
        }
    }
}
