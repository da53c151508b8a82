//! The client side of `--ca CERT` (and `--upstream-ca`): a certificate given
//! explicitly is trusted *as that certificate*.
//!
//! The file's certificates are trust anchors, as before: a server whose chain
//! leads to one of them is accepted (a private CA). On top of that, a server
//! presenting exactly one of the given certificates as its own (the same DER
//! bytes) is accepted even when webpki alone would refuse it for not being a
//! proper leaf: a self-signed certificate with `basicConstraints CA:TRUE` (what
//! the stock `openssl req -x509 -newkey ...` recipe makes, refused with
//! `CaUsedAsEndEntity`) or a leaf whose issuer is not in the file
//! (`UnknownIssuer`). That is what curl's `--cacert` and the Incus client's
//! pinned `servercerts/` accept.
//!
//! What is still checked for a pinned certificate, as curl does: its validity
//! period (webpki checks it before the chain, so a chain error means the dates
//! were fine; a unit test holds that), the host name (the URL's host must be in
//! its subjectAltName), and the handshake signature (the server holds the
//! private key). Only the "is it a proper leaf issued by a known CA" part is
//! replaced by "is it byte for byte the certificate I was given".
//!
//! ureq 3 takes no custom verifier through its `TlsConfig`, so [`agent`]
//! builds its connector chain with [`PinnedTlsConnector`] in place of ureq's
//! rustls connector (the same few lines: handshake, then a buffered transport).
//! Its transport also batches TLS records into large socket writes
//! ([`PinnedTlsTransport`]), so every client of imgsrv uses it, with the system
//! trust store when no `--ca` is given ([`agent_with_roots`]).

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, StreamOwned,
};
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout,
    TcpConnector, Transport, TransportAdapter,
};

/// Accepts what the webpki verifier accepts with the given certificates as
/// anchors, and a server certificate equal to one of them (see the module).
#[derive(Debug)]
pub struct PinnedVerifier {
    pinned: Vec<CertificateDer<'static>>,
    webpki: Arc<WebPkiServerVerifier>,
}

/// Chain errors a pinned certificate overrides: it is not a proper leaf
/// (`CaUsedAsEndEntity`) or its issuer is not among the anchors.
fn pin_overrides(e: &rustls::Error) -> bool {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => true,
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => matches!(
            o.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        ),
        _ => false,
    }
}

impl PinnedVerifier {
    /// `certs`: the PEM file's certificates (at least one).
    pub fn new(certs: Vec<CertificateDer<'static>>) -> anyhow::Result<PinnedVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs.iter().cloned());
        anyhow::ensure!(added > 0, "no certificate usable as a trust anchor");
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(PinnedVerifier {
            pinned: certs,
            webpki,
        })
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e) if pin_overrides(&e) && self.pinned.iter().any(|p| p == end_entity) => {
                // the dates passed (webpki checks them before the chain); the name:
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&cert, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration of the ring provider, TLS 1.3 and 1.2, whose
/// verifier is still to choose.
fn config_builder() -> anyhow::Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| anyhow::anyhow!("selecting TLS versions: {e}"))
}

/// The rustls client configuration trusting `certs` as [`PinnedVerifier`] does.
pub fn client_config(certs: Vec<CertificateDer<'static>>) -> anyhow::Result<Arc<ClientConfig>> {
    let verifier = PinnedVerifier::new(certs)?;
    let cfg = config_builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The PEM certificates of `path` (at least one).
pub fn load_pem(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(!certs.is_empty(), "no PEM certificate found");
    Ok(certs)
}

/// A ureq agent with `config` whose TLS trusts the certificates of `ca` as
/// [`PinnedVerifier`] does (the config's own TLS settings are not used).
pub fn agent(config: ureq::config::Config, ca: &Path) -> anyhow::Result<ureq::Agent> {
    agent_with_resolver(
        config,
        ca,
        ureq::unversioned::resolver::DefaultResolver::default(),
    )
}

/// [`agent`] with its own name resolution (the S3 store's, which answers
/// `*.localhost` itself: virtual-host bucket names under a local endpoint).
pub fn agent_with_resolver(
    config: ureq::config::Config,
    ca: &Path,
    resolver: impl ureq::unversioned::resolver::Resolver,
) -> anyhow::Result<ureq::Agent> {
    let tls = client_config(load_pem(ca)?)?;
    Ok(agent_from(config, tls, resolver))
}

/// A ureq agent with `config` trusting `roots` the ordinary way (a chain to
/// one of them), over this module's transport, whose batched TLS writes
/// ([`PinnedTlsTransport`]) every client of imgsrv uses: the system trust
/// store when no `--ca` is given.
pub fn agent_with_roots(
    config: ureq::config::Config,
    roots: &ureq::tls::RootCerts,
    resolver: impl ureq::unversioned::resolver::Resolver,
) -> anyhow::Result<ureq::Agent> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        ureq::tls::RootCerts::Specific(certs) => {
            let ders = certs.iter().map(|c| CertificateDer::from(c.der().to_vec()));
            let (added, _) = store.add_parsable_certificates(ders);
            anyhow::ensure!(added > 0, "no certificate usable as a trust anchor");
        }
        ureq::tls::RootCerts::WebPki => {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
        }
        other => anyhow::bail!("unsupported root certificates {other:?}"),
    }
    let tls = config_builder()?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(agent_from(config, Arc::new(tls), resolver))
}

fn agent_from(
    config: ureq::config::Config,
    tls: Arc<ClientConfig>,
    resolver: impl ureq::unversioned::resolver::Resolver,
) -> ureq::Agent {
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(TcpConnector::default())
            .chain(PinnedTlsConnector { config: tls });
    ureq::Agent::with_parts(config, connector, resolver)
}

/// Wraps the TCP transport of an https URL in rustls with a fixed config.
pub struct PinnedTlsConnector {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for PinnedTlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedTlsConnector").finish()
    }
}

impl<In: Transport> Connector<In> for PinnedTlsConnector {
    type Out = Either<In, PinnedTlsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details
            .uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| ureq::Error::Tls("invalid host name for TLS"))?;
        let mut conn = ClientConnection::new(self.config.clone(), name)?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock)?;
        // transmit_output queues one output buffer's plaintext at a time and
        // sends it in batches (send_records): the bound is that buffer, not
        // rustls's default 64 KiB, which would split every batch in two
        conn.set_buffer_limit(None);
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(PinnedTlsTransport {
            buffers,
            stream: StreamOwned { conn, sock },
        })))
    }
}

/// Writes the TLS records `conn` holds to `transport`, as many per socket write
/// as its output buffer takes; with `all` false only while a full buffer's
/// worth is queued.
fn send_records(
    conn: &mut ClientConnection,
    transport: &mut dyn Transport,
    timeout: NextTimeout,
    all: bool,
) -> Result<(), ureq::Error> {
    /// Gathers the records rustls offers into the transport's output buffer.
    struct Batch<'a> {
        transport: &'a mut dyn Transport,
        timeout: NextTimeout,
        all: bool,
    }
    impl Write for Batch<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.write_vectored(&[std::io::IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            let out = self.transport.buffers().output();
            let queued: usize = bufs.iter().map(|b| b.len()).sum();
            if !self.all && queued < out.len() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(out.len() - n);
                out[n..n + take].copy_from_slice(&b[..take]);
                n += take;
                if n == out.len() {
                    break;
                }
            }
            self.transport
                .transmit_output(n, self.timeout)
                .map_err(|e| e.into_io())?;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut batch = Batch {
        transport,
        timeout,
        all,
    };
    while conn.wants_write() {
        match conn.write_tls(&mut batch) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !all => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// An established TLS connection (as ureq's own rustls transport).
pub struct PinnedTlsTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl fmt::Debug for PinnedTlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedTlsTransport").finish()
    }
}

impl Transport for PinnedTlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    /// Encrypts `amount` bytes and hands the records to the TCP transport in
    /// batches as large as its buffer rather than a socket write per record (a
    /// TLS record carries 16 KiB: a 1 GiB upload made 65,000 `sendto` calls,
    /// and on loopback each also runs the receiving side's network stack).
    /// What is left, less than one batch, goes with the next output or before
    /// the next read ([`Self::await_input`]).
    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let StreamOwned { conn, sock } = &mut self.stream;
        sock.set_timeout(timeout);
        // no buffer limit (set at the handshake): the writer takes it all at once
        conn.writer().write_all(&self.buffers.output()[..amount])?;
        send_records(conn, sock.get_mut(), timeout, false)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        {
            let StreamOwned { conn, sock } = &mut self.stream;
            send_records(conn, sock.get_mut(), timeout, true)?;
        }
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` as the openssl recipe makes it
    /// (CA:TRUE), valid from `from` to `to` days from now.
    fn ca_cert(from: i64, to: i64, name: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let at = |d: i64| {
            let secs = u64::try_from(now + d * 86400).unwrap();
            rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(secs)
        };
        p.not_before = at(from);
        p.not_after = at(to);
        p.self_signed(&key).unwrap().der().clone()
    }

    fn verify(
        pinned: &CertificateDer<'static>,
        presented: &CertificateDer<'_>,
        host: &str,
    ) -> Result<(), rustls::Error> {
        let v = PinnedVerifier::new(vec![pinned.clone()]).unwrap();
        let name = ServerName::try_from(host.to_string()).unwrap();
        v.verify_server_cert(presented, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn a_pinned_ca_certificate_is_accepted_for_its_names_and_dates_only() {
        let good = ca_cert(-1, 30, "127.0.0.1");
        // webpki alone refuses it as an end entity
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            r.add(good.clone()).unwrap();
            Arc::new(r)
        };
        let plain = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let e = plain
            .verify_server_cert(&good, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(pin_overrides(&e), "{e:?}");
        // pinned, it is accepted
        verify(&good, &good, "127.0.0.1").unwrap();
        // not for another name
        let e = verify(&good, &good, "127.0.0.2").unwrap_err();
        assert!(format!("{e:?}").contains("NotValidForName"), "{e:?}");
        // not another certificate
        let other = ca_cert(-1, 30, "127.0.0.1");
        let e = verify(&good, &other, "127.0.0.1").unwrap_err();
        assert!(pin_overrides(&e), "{e:?}");
        // not expired, not before its time (webpki checks dates before the chain)
        let expired = ca_cert(-30, -1, "127.0.0.1");
        let e = verify(&expired, &expired, "127.0.0.1").unwrap_err();
        assert!(format!("{e:?}").contains("Expired"), "{e:?}");
        let future = ca_cert(1, 30, "127.0.0.1");
        let e = verify(&future, &future, "127.0.0.1").unwrap_err();
        assert!(format!("{e:?}").contains("NotValidYet"), "{e:?}");
    }
}
