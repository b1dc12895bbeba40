//! Who sent a frame. Identity is derived from the verified client certificate only
//! (its single SPIFFE URI SAN), never from the payload.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// A device id as named in its certificate: `[A-Za-z0-9._-]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

/// A fleet id as named in its certificate: `[A-Za-z0-9._-]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FleetId(Arc<str>);

macro_rules! id_type {
    ($t:ident) => {
        impl $t {
            pub fn parse(s: &str) -> Result<Self, IdentityError> {
                if valid_component(s) {
                    Ok(Self(Arc::from(s)))
                } else {
                    Err(IdentityError::InvalidComponent(s.to_owned()))
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
id_type!(DeviceId);
id_type!(FleetId);

fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The authenticated sender of a connection, fixed at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub device_id: DeviceId,
    pub fleet_id: FleetId,
    /// SHA-256 of the certificate DER, lowercase hex.
    pub cert_sha256: String,
    /// Certificate serial, lowercase hex without leading zero bytes.
    pub cert_serial: String,
}

/// Why a certificate does not name a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate is not valid DER X.509")]
    Unparseable,
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("certificate has {0} SPIFFE URI SANs, exactly one is required")]
    AmbiguousSpiffeId(usize),
    #[error("SPIFFE id trust domain {found:?} is not {expected:?}")]
    ForeignTrustDomain { found: String, expected: String },
    #[error("SPIFFE id path must be /fleet/<fleet>/device/<device>: {0:?}")]
    BadPath(String),
    #[error("invalid identity component {0:?}")]
    InvalidComponent(String),
    #[error("fleet {fleet:?} must be issued by its own CA ({detail})")]
    FleetCaMismatch { fleet: String, detail: &'static str },
}

impl IdentityError {
    /// Stable label for handshake-refusal metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unparseable => "cert_unparseable",
            Self::NoSpiffeId => "spiffe_id_missing",
            Self::AmbiguousSpiffeId(_) => "spiffe_id_ambiguous",
            Self::ForeignTrustDomain { .. } => "spiffe_trust_domain",
            Self::BadPath(_) | Self::InvalidComponent(_) => "spiffe_id_invalid",
            Self::FleetCaMismatch { .. } => "fleet_ca_mismatch",
        }
    }
}

/// Parses `spiffe://<trust_domain>/fleet/<fleet>/device/<device>`.
pub fn parse_spiffe_id(
    uri: &str,
    trust_domain: &str,
) -> Result<(FleetId, DeviceId), IdentityError> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| IdentityError::BadPath(uri.to_owned()))?;
    let (domain, path) = rest
        .split_once('/')
        .ok_or_else(|| IdentityError::BadPath(uri.to_owned()))?;
    if !domain.eq_ignore_ascii_case(trust_domain) {
        return Err(IdentityError::ForeignTrustDomain {
            found: domain.to_owned(),
            expected: trust_domain.to_owned(),
        });
    }
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["fleet", fleet, "device", device] => {
            Ok((FleetId::parse(fleet)?, DeviceId::parse(device)?))
        }
        _ => Err(IdentityError::BadPath(uri.to_owned())),
    }
}

/// Derives the device identity from an end-entity certificate (DER) that the TLS
/// layer has already verified against the fleet CA.
pub fn identity_from_cert(der: &[u8], trust_domain: &str) -> Result<DeviceIdentity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparseable)?;
    let spiffe: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparseable)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match spiffe.as_slice() {
        [] => return Err(IdentityError::NoSpiffeId),
        [one] => *one,
        many => return Err(IdentityError::AmbiguousSpiffeId(many.len())),
    };
    let (fleet_id, device_id) = parse_spiffe_id(uri, trust_domain)?;
    let serial = cert.tbs_certificate.raw_serial();
    let first_nonzero = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    Ok(DeviceIdentity {
        device_id,
        fleet_id,
        cert_sha256: hex::encode(Sha256::digest(der)),
        cert_serial: hex::encode(&serial[first_nonzero..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_well_formed_spiffe_id() {
        let (f, d) = parse_spiffe_id(
            "spiffe://fleetgate.test/fleet/f1/device/car-7",
            "fleetgate.test",
        )
        .unwrap();
        assert_eq!((f.as_str(), d.as_str()), ("f1", "car-7"));
    }

    #[test]
    fn refuses_foreign_domains_and_odd_paths() {
        let td = "fleetgate.test";
        for (uri, want) in [
            (
                "spiffe://evil.test/fleet/f1/device/d",
                "spiffe_trust_domain",
            ),
            (
                "spiffe://fleetgate.test/fleet/f1/device/d/extra",
                "spiffe_id_invalid",
            ),
            ("spiffe://fleetgate.test/device/d", "spiffe_id_invalid"),
            (
                "spiffe://fleetgate.test/fleet/f1/device/..%2f",
                "spiffe_id_invalid",
            ),
            (
                "spiffe://fleetgate.test/fleet//device/d",
                "spiffe_id_invalid",
            ),
            (
                "https://fleetgate.test/fleet/f1/device/d",
                "spiffe_id_invalid",
            ),
        ] {
            assert_eq!(
                parse_spiffe_id(uri, td).unwrap_err().as_str(),
                want,
                "{uri}"
            );
        }
    }

    #[test]
    fn identity_comes_from_the_certificate() {
        let ca = fleetgate_pki::DevCa::generate("t").unwrap();
        let issued = ca
            .issue_device(&fleetgate_pki::DeviceCertSpec::new(
                "fleetgate.test",
                "f1",
                "d9",
            ))
            .unwrap();
        let der = pem_to_der(&issued.cert_pem);
        let id = identity_from_cert(&der, "fleetgate.test").unwrap();
        assert_eq!(id.device_id.as_str(), "d9");
        assert_eq!(id.fleet_id.as_str(), "f1");
        assert_eq!(id.cert_serial, issued.serial_hex);
        assert_eq!(id.cert_sha256.len(), 64);
    }

    #[test]
    fn two_spiffe_sans_are_ambiguous() {
        let ca = fleetgate_pki::DevCa::generate("t").unwrap();
        let mut spec = fleetgate_pki::DeviceCertSpec::new("fleetgate.test", "f1", "d9");
        spec.extra_uris
            .push("spiffe://fleetgate.test/fleet/f2/device/other".into());
        let der = pem_to_der(&ca.issue_device(&spec).unwrap().cert_pem);
        assert_eq!(
            identity_from_cert(&der, "fleetgate.test").unwrap_err(),
            IdentityError::AmbiguousSpiffeId(2)
        );
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let mut reader = pem.as_bytes();
        let first = rustls_pemfile::certs(&mut reader).next();
        first.unwrap().unwrap().to_vec()
    }
}
