//! Development PKI: a fleet CA that signs the ingest server certificate and device
//! certificates carrying `spiffe://<trust-domain>/fleet/<fleet>/device/<device>` URI SANs.
//! Production fleets bring their own CA; this exists so demos and tests use real X.509.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid identity component {0:?}: use [A-Za-z0-9._-]")]
    InvalidName(String),
}

/// A PEM certificate and its private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// Serial number, lowercase hex (as ingest reports it in provenance).
    pub serial_hex: String,
}

impl Issued {
    /// Writes `<stem>.pem` and `<stem>.key` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert_pem)?;
        write_file(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

/// What a device certificate should look like; the knobs exist so tests can mint the
/// certificates ingest must refuse (expired, foreign trust domain, no or two SANs).
#[derive(Debug, Clone)]
pub struct DeviceCertSpec {
    pub trust_domain: String,
    pub fleet_id: String,
    pub device_id: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Extra URI SANs beyond the SPIFFE one; `spiffe_san = false` drops that one.
    pub extra_uris: Vec<String>,
    pub spiffe_san: bool,
}

impl DeviceCertSpec {
    /// A valid one-year certificate for `fleet/device`.
    pub fn new(trust_domain: &str, fleet_id: &str, device_id: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            trust_domain: trust_domain.to_owned(),
            fleet_id: fleet_id.to_owned(),
            device_id: device_id.to_owned(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(365),
            extra_uris: Vec::new(),
            spiffe_san: true,
        }
    }

    /// A certificate whose validity ended an hour ago.
    pub fn expired(mut self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - Duration::days(30);
        self.not_after = now - Duration::hours(1);
        self
    }

    pub fn spiffe_uri(&self) -> String {
        spiffe_uri(&self.trust_domain, &self.fleet_id, &self.device_id)
    }
}

/// `spiffe://<trust-domain>/fleet/<fleet>/device/<device>`.
pub fn spiffe_uri(trust_domain: &str, fleet_id: &str, device_id: &str) -> String {
    format!("spiffe://{trust_domain}/fleet/{fleet_id}/device/{device_id}")
}

/// What an operator certificate should look like: the single URI SAN
/// `spiffe://<trust-domain>/operator/<name>` and clientAuth. Operators sign quarantine
/// decisions with it, so their audit records are attributable to a person.
#[derive(Debug, Clone)]
pub struct OperatorCertSpec {
    pub trust_domain: String,
    pub name: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl OperatorCertSpec {
    /// A valid 90-day certificate for operator `name`.
    pub fn new(trust_domain: &str, name: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            trust_domain: trust_domain.to_owned(),
            name: name.to_owned(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(90),
        }
    }

    /// A certificate whose validity ended an hour ago.
    pub fn expired(mut self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - Duration::days(30);
        self.not_after = now - Duration::hours(1);
        self
    }

    pub fn spiffe_uri(&self) -> String {
        operator_spiffe_uri(&self.trust_domain, &self.name)
    }
}

/// `spiffe://<trust-domain>/operator/<name>`.
pub fn operator_spiffe_uri(trust_domain: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/operator/{name}")
}

/// A certificate authority that can issue server and device certificates and CRLs.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

impl DevCa {
    /// A new self-signed CA named `common_name`, valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(Self { issuer, key_pem })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes `ca.pem` and `ca.key` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        write_file(&dir.join("ca.pem"), &self.cert_pem())?;
        write_file(&dir.join("ca.key"), &self.key_pem)
    }

    /// Loads a CA written by [`DevCa::write`].
    pub fn load(dir: &Path) -> Result<LoadedCa, PkiError> {
        let cert_pem = read_file(&dir.join("ca.pem"))?;
        let key = KeyPair::from_pem(&read_file(&dir.join("ca.key"))?)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(LoadedCa { issuer, cert_pem })
    }

    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        issue_server(&self.issuer, names)
    }

    pub fn issue_device(&self, spec: &DeviceCertSpec) -> Result<Issued, PkiError> {
        issue_device(&self.issuer, spec)
    }

    pub fn issue_operator(&self, spec: &OperatorCertSpec) -> Result<Issued, PkiError> {
        issue_operator(&self.issuer, spec)
    }

    /// A CRL revoking `serials_hex`, valid for a week.
    pub fn crl_pem(&self, serials_hex: &[&str]) -> Result<String, PkiError> {
        crl_pem(&self.issuer, serials_hex)
    }
}

/// A CA read back from disk: issues certificates, but its own certificate is kept as PEM.
pub struct LoadedCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl LoadedCa {
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        issue_server(&self.issuer, names)
    }
    pub fn issue_device(&self, spec: &DeviceCertSpec) -> Result<Issued, PkiError> {
        issue_device(&self.issuer, spec)
    }
    pub fn issue_operator(&self, spec: &OperatorCertSpec) -> Result<Issued, PkiError> {
        issue_operator(&self.issuer, spec)
    }
    pub fn crl_pem(&self, serials_hex: &[&str]) -> Result<String, PkiError> {
        crl_pem(&self.issuer, serials_hex)
    }
}

fn issue_server(issuer: &Issuer<'_, KeyPair>, names: &[&str]) -> Result<Issued, PkiError> {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name = dn("fleetgate ingest");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365);
    sign(params, issuer)
}

fn check_names(parts: &[&String]) -> Result<(), PkiError> {
    for part in parts {
        if part.is_empty()
            || !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(PkiError::InvalidName((*part).clone()));
        }
    }
    Ok(())
}

fn issue_operator(
    issuer: &Issuer<'_, KeyPair>,
    spec: &OperatorCertSpec,
) -> Result<Issued, PkiError> {
    check_names(&[&spec.trust_domain, &spec.name])?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("operator {}", spec.name));
    params.subject_alt_names = vec![SanType::URI(spec.spiffe_uri().try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    sign(params, issuer)
}

fn issue_device(issuer: &Issuer<'_, KeyPair>, spec: &DeviceCertSpec) -> Result<Issued, PkiError> {
    check_names(&[&spec.trust_domain, &spec.fleet_id, &spec.device_id])?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("{}/{}", spec.fleet_id, spec.device_id));
    let mut uris = Vec::new();
    if spec.spiffe_san {
        uris.push(spec.spiffe_uri());
    }
    uris.extend(spec.extra_uris.iter().cloned());
    params.subject_alt_names = uris
        .into_iter()
        .map(|u| Ok(SanType::URI(u.try_into()?)))
        .collect::<Result<_, rcgen::Error>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    sign(params, issuer)
}

fn sign(mut params: CertificateParams, issuer: &Issuer<'_, KeyPair>) -> Result<Issued, PkiError> {
    let serial = random_serial();
    let serial_hex = hex_lower(serial.as_ref());
    params.serial_number = Some(serial);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial_hex,
    })
}

fn crl_pem(issuer: &Issuer<'_, KeyPair>, serials_hex: &[&str]) -> Result<String, PkiError> {
    let now = OffsetDateTime::now_utc();
    let revoked_certs = serials_hex
        .iter()
        .map(|s| {
            let bytes = decode_hex(s).ok_or_else(|| PkiError::InvalidName(s.to_string()))?;
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: now - Duration::seconds(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(1),
        next_update: now + Duration::days(7),
        crl_number: SerialNumber::from(now.unix_timestamp() as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fleetgate development");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 16 random bytes with the top bit clear, so the DER INTEGER stays positive and
/// its hex form is the same on both sides.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x10;
    SerialNumber::from_slice(&bytes)
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn write_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_cert_carries_exactly_its_spiffe_uri() {
        let ca = DevCa::generate("test ca").unwrap();
        let issued = ca
            .issue_device(&DeviceCertSpec::new("fleetgate.test", "f1", "d1"))
            .unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(issued.serial_hex.len(), 32);
        assert_ne!(
            issued.serial_hex,
            ca.issue_device(&DeviceCertSpec::new("fleetgate.test", "f1", "d1"))
                .unwrap()
                .serial_hex
        );
    }

    #[test]
    fn rejects_path_characters_in_names() {
        let ca = DevCa::generate("test ca").unwrap();
        let err = ca
            .issue_device(&DeviceCertSpec::new("fleetgate.test", "f1", "d1/../x"))
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidName(_)));
    }

    #[test]
    fn operator_cert_is_a_p256_client_cert_with_the_operator_uri() {
        let ca = DevCa::generate("test ca").unwrap();
        let spec = OperatorCertSpec::new("fleetgate.test", "alice");
        assert_eq!(spec.spiffe_uri(), "spiffe://fleetgate.test/operator/alice");
        let issued = ca.issue_operator(&spec).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .expect("has a SAN extension")
            .value
            .general_names
            .iter()
            .map(|name| match name {
                x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect();
        let eku = cert.extended_key_usage().unwrap().expect("has EKU").value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(uris, ["spiffe://fleetgate.test/operator/alice"]);
        let key = KeyPair::from_pem(&issued.key_pem).unwrap();
        assert!(key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
        let err = ca
            .issue_operator(&OperatorCertSpec::new("fleetgate.test", "a/../b"))
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidName(_)));
    }

    #[test]
    fn ca_round_trips_through_disk() {
        let dir = std::env::temp_dir().join(format!("fg-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = DevCa::generate("test ca").unwrap();
        ca.write(&dir).unwrap();
        let loaded = DevCa::load(&dir).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        loaded
            .issue_device(&DeviceCertSpec::new("fleetgate.test", "f1", "d2"))
            .unwrap();
        assert!(loaded.crl_pem(&["10aa"]).unwrap().contains("X509 CRL"));
    }
}
