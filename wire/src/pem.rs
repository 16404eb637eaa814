//! TLS material in PEM files, parsed (pure: the caller reads the file and
//! names it in errors). One definition for the broker and the client, so
//! both accept the same files and say the same of a bad one.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of a PEM file, in order (at least one).
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in it".into());
    }
    Ok(certs)
}

/// The (first) private key of a PEM file: PKCS#8, PKCS#1 or SEC1.
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_foreign_files_say_what_is_missing() {
        assert_eq!(certificates(b"").unwrap_err(), "no CERTIFICATE block in it");
        assert!(
            private_key(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
                .unwrap_err()
                .contains("no PEM private key")
        );
        assert!(
            certificates(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}
