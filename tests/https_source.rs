//! HTTPS to the source with a custom CA (`ca_file` of a source): a test CA and a server
//! certificate for 127.0.0.1 made with openssl, served by `openssl s_server -WWW` on 127.0.0.1.
//! With the CA the fetch succeeds; without it the certificate is refused (a transient failure:
//! nothing is fetched, nothing is gone); a missing or empty CA file is a configuration error that
//! names the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use refetch::{EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher};
use refetch_http::{HttpFetcher, SourceConfig};
use refetch_testkit::process::wait_for;

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fetcher(url: &str, ca_file: Option<&Path>) -> Result<HttpFetcher, refetch_http::ConfigError> {
    HttpFetcher::builder()
        .source(
            "customer",
            SourceConfig {
                // s_server -WWW answers text/plain.
                expect_json: false,
                ca_file: ca_file.map(Path::to_path_buf),
                timeout: Duration::from_secs(5),
                ..SourceConfig::new(url)
            },
        )
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_source_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ]
        .into_iter()
        .chain([
            "-subj",
            "/CN=refetch test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])
        .collect::<Vec<_>>(),
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ]
        .into_iter()
        .chain(["-keyout", "server.key", "-out", "server.csr"])
        .collect::<Vec<_>>(),
    );
    std::fs::write(d.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
        ]
        .into_iter()
        .chain([
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext",
            "-out",
            "server.pem",
        ])
        .collect::<Vec<_>>(),
    );
    let www = d.join("www");
    std::fs::create_dir_all(www.join("customer")).unwrap();
    std::fs::write(www.join("customer/7"), r#"{"id":"7","name":"over TLS"}"#).unwrap();
    let port = free_port();
    let _server = tokio::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-WWW", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cert", "../server.pem", "-key", "../server.key"])
        .current_dir(&www)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(
        "the TLS server to listen",
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await
    .unwrap();
    let url = format!("https://127.0.0.1:{port}/customer/{{id}}");
    let req = FetchRequest::new(EntityKey::new("customer", "7"));

    let trusted = fetcher(&url, Some(&d.join("ca.pem"))).unwrap();
    match trusted.fetch(&req).await {
        Ok(FetchOutcome::Found(e)) => {
            assert_eq!(&e.body[..], br#"{"id":"7","name":"over TLS"}"#);
        }
        other => panic!("expected the entity over TLS, got {other:?}"),
    }

    // Without the CA: refused, transient (a certificate problem is not the entity's fault).
    let untrusted = fetcher(&url, None).unwrap();
    match untrusted.fetch(&req).await {
        Err(e @ FetchError::Transient { .. }) => {
            assert!(!e.message().is_empty());
        }
        other => panic!("expected a refused certificate, got {other:?}"),
    }

    let missing = d.join("no-such-ca.pem");
    let err = fetcher(&url, Some(&missing)).unwrap_err().to_string();
    assert!(err.contains("no-such-ca.pem"), "{err}");
    std::fs::write(d.join("empty.pem"), "not a certificate\n").unwrap();
    let err = fetcher(&url, Some(&d.join("empty.pem")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty.pem"), "{err}");
}
