//! Device certificates for load generation: read from the load-tester's PKI dir
//! (`devices/<fleet>/<device>.{pem,key}`) or, when missing, issued in memory from
//! `ca.pem` + `ca.key`, so a recording of any fleet can be driven without preparing
//! one certificate per device first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fleetgate_pki::{DevCa, DeviceCertSpec, LoadedCa};

/// A device's certificate and key (PEM).
#[derive(Debug)]
pub struct DeviceCredentials {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Why a device's credentials could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no certificate for {fleet}/{device} in {dir} and no CA (ca.pem + ca.key) to issue one: {detail}")]
    NoCa {
        fleet: String,
        device: String,
        dir: PathBuf,
        detail: String,
    },
    #[error("issuing a certificate for {fleet}/{device}: {detail}")]
    Issue {
        fleet: String,
        device: String,
        detail: String,
    },
}

/// Credentials per device, read or issued once and kept for the recorder's life.
pub struct CredentialStore {
    pki_dir: PathBuf,
    fleet: String,
    trust_domain: String,
    state: Mutex<CredState>,
}

#[derive(Default)]
struct CredState {
    ca: Option<LoadedCa>,
    by_device: HashMap<String, Arc<DeviceCredentials>>,
    issued: u64,
}

impl CredentialStore {
    pub fn new(pki_dir: &Path, fleet: &str, trust_domain: &str) -> Self {
        Self {
            pki_dir: pki_dir.to_owned(),
            fleet: fleet.to_owned(),
            trust_domain: trust_domain.to_owned(),
            state: Mutex::new(CredState::default()),
        }
    }

    /// How many certificates were issued in memory so far.
    pub fn issued(&self) -> u64 {
        self.lock().issued
    }

    /// The credentials of `device` (synchronous: a file read or one signature).
    pub fn get(&self, device: &str) -> Result<Arc<DeviceCredentials>, CredentialError> {
        let mut state = self.lock();
        if let Some(c) = state.by_device.get(device) {
            return Ok(c.clone());
        }
        let dir = self.pki_dir.join("devices").join(&self.fleet);
        let (cert, key) = (
            dir.join(format!("{device}.pem")),
            dir.join(format!("{device}.key")),
        );
        let creds = if cert.is_file() && key.is_file() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| CredentialError::Read {
                    path: p.to_owned(),
                    source,
                })
            };
            DeviceCredentials {
                cert_pem: read(&cert)?,
                key_pem: read(&key)?,
            }
        } else {
            if state.ca.is_none() {
                state.ca = Some(
                    DevCa::load(&self.pki_dir).map_err(|e| CredentialError::NoCa {
                        fleet: self.fleet.clone(),
                        device: device.to_owned(),
                        dir: dir.clone(),
                        detail: e.to_string(),
                    })?,
                );
            }
            let spec = DeviceCertSpec::new(&self.trust_domain, &self.fleet, device);
            let issued = state
                .ca
                .as_ref()
                .expect("loaded just above")
                .issue_device(&spec)
                .map_err(|e| CredentialError::Issue {
                    fleet: self.fleet.clone(),
                    device: device.to_owned(),
                    detail: e.to_string(),
                })?;
            state.issued += 1;
            DeviceCredentials {
                cert_pem: issued.cert_pem,
                key_pem: issued.key_pem,
            }
        };
        let creds = Arc::new(creds);
        state.by_device.insert(device.to_owned(), creds.clone());
        Ok(creds)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CredState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_pki_dir_or_are_issued_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("record test CA").unwrap();
        ca.write(dir.path()).unwrap();
        let on_disk = ca
            .issue_device(&DeviceCertSpec::new("td", "fleet-a", "car-1"))
            .unwrap();
        let devdir = dir.path().join("devices/fleet-a");
        std::fs::create_dir_all(&devdir).unwrap();
        on_disk.write(&devdir, "car-1").unwrap();

        let store = CredentialStore::new(dir.path(), "fleet-a", "td");
        assert_eq!(store.get("car-1").unwrap().cert_pem, on_disk.cert_pem);
        let issued = store.get("car-2").unwrap();
        assert_eq!(store.issued(), 1);
        assert!(Arc::ptr_eq(&issued, &store.get("car-2").unwrap()));
        assert_eq!(store.issued(), 1, "cached, not issued twice");
    }

    #[test]
    fn missing_ca_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::new(dir.path(), "fleet-a", "td");
        let err = store.get("car-9").unwrap_err().to_string();
        assert!(
            err.contains("fleet-a/car-9") && err.contains("ca.pem"),
            "{err}"
        );
    }
}
