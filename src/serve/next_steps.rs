//! What `imgsrv serve` prints when it starts, after its `imgsrv serving`
//! line: the certificate's SHA-256 fingerprint (to compare with what `incus
//! remote add` shows), the two ways to add the server to Incus, and where the
//! admin token is.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use sha2::{Digest, Sha256};

/// SHA-256 of the first certificate of a PEM file (its DER), as lowercase hex.
pub fn cert_sha256(pem: &Path) -> anyhow::Result<String> {
    let data = std::fs::read(pem)?;
    let cert = rustls_pemfile::certs(&mut data.as_slice())
        .next()
        .ok_or_else(|| anyhow::anyhow!("{} holds no certificate", pem.display()))??;
    Ok(hex::encode(Sha256::digest(cert.as_ref())))
}

/// `AB:CD:...`, as `openssl x509 -fingerprint -sha256` prints it.
pub fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// The host clients should use for a server listening on `addr`: its own
/// address, or for a wildcard listener this machine's name (it is in the
/// generated certificate), else 127.0.0.1.
fn client_host(addr: SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => {
            crate::tls::host_name().unwrap_or_else(|| "127.0.0.1".to_string())
        }
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}

/// Writes the next steps for a server on `addr` with certificate `cert`.
pub fn print(
    out: &mut dyn Write,
    data_dir: &Path,
    addr: SocketAddr,
    cert: &Path,
) -> std::io::Result<()> {
    let url = format!("https://{}:{}", client_host(addr), addr.port());
    match cert_sha256(cert) {
        Ok(fp) => writeln!(
            out,
            "certificate {}: SHA-256 fingerprint {} (incus shows it as {fp})",
            cert.display(),
            colon_hex(&fp)
        )?,
        Err(e) => writeln!(out, "certificate {}: {e:#}", cert.display())?,
    }
    writeln!(out, "next steps, on an Incus client:")?;
    writeln!(
        out,
        "  incus remote add imgsrv {url}    # the Incus protocol: check the fingerprint it shows against the one above, answer y"
    )?;
    writeln!(
        out,
        "  incus remote add imgsrv-ss {url} --protocol=simplestreams    # Simple Streams: the client must trust {} itself first",
        cert.display()
    )?;
    let token = data_dir.join(crate::auth::ADMIN_TOKEN_FILE);
    if token.is_file() {
        writeln!(
            out,
            "  the admin API token is in {} (imgsrv publish --server {url} --ca {} --token-file {} ...)",
            token.display(),
            cert.display(),
            token.display()
        )?;
    } else {
        writeln!(
            out,
            "  API tokens: imgsrv token issue --data {} PRINCIPAL",
            data_dir.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_forms() {
        assert_eq!(colon_hex("ab01ff"), "AB:01:FF");
        let wild: SocketAddr = "0.0.0.0:8443".parse().unwrap();
        assert!(!client_host(wild).is_empty());
        assert_eq!(client_host("[::1]:1".parse().unwrap()), "[::1]");
        assert_eq!(client_host("127.0.0.1:1".parse().unwrap()), "127.0.0.1");
    }
}
