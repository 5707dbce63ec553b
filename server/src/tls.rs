//! HTTPS and WSS on the server's one port: rustls (no OpenSSL) with a certificate
//! from PEM files, or one generated for this host (`--tls-self-signed`). The
//! handshakes themselves run in `listen.rs`, each in its connection's task.

use std::io;
use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Why TLS could not be set up.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the certificate and key.
    #[error("the certificate and key do not work together: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating a certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing the generated certificate failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A server certificate ready to serve, and how to tell clients to trust it.
pub struct Certificate {
    /// The rustls configuration (HTTP/1.1 only: axum's WebSocket upgrade needs it).
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate (the fingerprint browsers show), hex with colons.
    pub fingerprint: String,
    /// SHA-256 of the leaf's public key, base64: what Chromium's
    /// `--ignore-certificate-errors-spki-list` takes.
    pub spki_sha256: String,
    /// Where the PEM certificate lies (workers pass it to `--ca-cert`).
    pub cert_path: PathBuf,
    /// The names and addresses it is valid for, when generated here.
    pub names: Vec<String>,
}

/// Loads a certificate chain and its private key from PEM files.
pub fn from_pem(cert_path: &Path, key_path: &Path) -> Result<Certificate, TlsError> {
    let pem_err = |path: &Path, why: String| TlsError::Pem {
        path: path.to_path_buf(),
        why,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| pem_err(cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(cert_path, "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| pem_err(key_path, format!("no usable private key ({e})")))?;
    certificate(chain, key, cert_path.to_path_buf(), Vec::new())
}

fn certificate(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    names: Vec<String>,
) -> Result<Certificate, TlsError> {
    let fingerprint = Sha256::digest(&chain[0])
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let spki_sha256 = spki_sha256(&chain[0]).unwrap_or_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Certificate {
        config: Arc::new(config),
        fingerprint,
        spki_sha256,
        cert_path,
        names,
    })
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo, base64.
fn spki_sha256(cert: &CertificateDer<'_>) -> Option<String> {
    let spki = find_spki(cert.as_ref())?;
    Some(base64(&Sha256::digest(spki)))
}

/// Finds the DER SubjectPublicKeyInfo inside a certificate: the sequence that
/// follows the validity and subject in TBSCertificate. Walks the DER by hand so
/// no X.509 parser is needed for this one field.
fn find_spki(der: &[u8]) -> Option<&[u8]> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &b| a << 8 | b as usize);
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature, issuer, validity, subject, spki
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..5 {
        rest = tlv(rest)?.2;
    }
    let before = rest;
    let (_, _, after) = tlv(rest)?;
    Some(&before[..before.len() - after.len()])
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |a, &b| a << 8 | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The names a self-signed certificate for this host covers: `localhost`, the
/// host name, the loopback addresses, the address a listener is bound to (when
/// specific), the address this host reaches other networks from, and `extra`.
pub fn host_names(bound: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(host.trim().to_string());
    } else if let Ok(host) = std::env::var("HOSTNAME") {
        names.push(host);
    }
    if !bound.is_unspecified() {
        names.push(bound.to_string());
    }
    // Connecting a UDP socket sends nothing; it only picks the outgoing interface.
    if let Ok(s) = UdpSocket::bind("0.0.0.0:0")
        && s.connect("192.0.2.1:9").is_ok()
        && let Ok(local) = s.local_addr()
    {
        names.push(local.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    names.retain(|n| !n.is_empty());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// A self-signed certificate for `names`, kept in `dir` (`cert.pem`, `key.pem`,
/// `names.txt`) so that workers that trusted it keep trusting it across restarts;
/// made anew when the names change.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<Certificate, TlsError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let names_path = dir.join("names.txt");
    let wanted = names.join("\n");
    let same = std::fs::read_to_string(&names_path).is_ok_and(|n| n == wanted);
    if same && cert_path.is_file() && key_path.is_file() {
        let mut c = from_pem(&cert_path, &key_path)?;
        c.names = names.to_vec();
        return Ok(c);
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tether self-signed");
    let cert = params.self_signed(&key)?;
    let write = |path: &Path, text: String, private: bool| {
        write_file(path, text.as_bytes(), private).map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write(&key_path, key.serialize_pem(), true)?;
    write(&cert_path, cert.pem(), false)?;
    write(&names_path, wanted, false)?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        why: e.to_string(),
    })?;
    certificate(vec![cert.der().clone()], der, cert_path, names.to_vec())
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    use std::io::Write;
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn a_generated_certificate_is_kept_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("tether-tls-{}", std::process::id()));
        let names = host_names("0.0.0.0".parse().unwrap(), &["example.test".into()]);
        assert!(names.contains(&"localhost".to_string()));
        assert!(names.contains(&"example.test".to_string()));
        let a = self_signed(&dir, &names).unwrap();
        let b = self_signed(&dir, &names).unwrap();
        assert_eq!(
            a.fingerprint, b.fingerprint,
            "the same names reuse the certificate"
        );
        assert_eq!(a.spki_sha256.len(), 44);
        let c = self_signed(&dir, &names[..2]).unwrap();
        assert_ne!(a.fingerprint, c.fingerprint, "other names make a new one");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is private");
        }
        let bad = from_pem(&dir.join("names.txt"), &dir.join("key.pem"))
            .err()
            .unwrap();
        assert!(bad.to_string().contains("names.txt"), "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
