//! The data download path against a loopback HTTP server: missing files are fetched,
//! verified against their pinned checksums and only then put in place; a file that does not
//! match is refused with nothing left behind; no server gives a clear error.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;

use kvzip_eval::download::{download, verify, Checksum, DataFile};
use sha2::{Digest, Sha256};

/// Serves `files` (`(url path, body)`) over HTTP/1.0 on loopback until the test ends.
fn serve(files: Vec<(String, Vec<u8>)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" {
                    break;
                }
            }
            let mut out = stream;
            match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => {
                    let _ = write!(
                        out,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = out.write_all(body);
                }
                None => {
                    let _ = write!(out, "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                }
            }
        }
    });
    base
}

fn file(rel: &str, body: &[u8]) -> DataFile {
    let sha: String = Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    DataFile {
        rel: rel.into(),
        url: format!("https://example.invalid/{rel}"),
        size: body.len() as u64,
        checksum: Checksum::Sha256(Box::leak(sha.into_boxed_str())),
    }
}

fn left_over(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push(e);
    }
    out
}

fn walk(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p.display().to_string());
            }
        }
    }
    v
}

#[test]
fn downloads_verify_and_refuse_wrong_files() {
    let a = b"first essay\n".to_vec();
    let b = b"{\"question\": \"1+1?\", \"answer\": \"#### 2\"}\n".to_vec();
    let base = serve(vec![
        ("/pg-essays/a.txt".into(), a.clone()),
        ("/gsm8k/test.jsonl".into(), b.clone()),
        ("/wrong/file.txt".into(), b"tampered".to_vec()),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let files = vec![file("pg-essays/a.txt", &a), file("gsm8k/test.jsonl", &b)];
    download(&root, &files, Some(&base)).expect("download");
    for f in &files {
        verify(&root.join(&f.rel), f).expect("verified in place");
    }
    // Present files are not fetched again (the server no longer matters).
    download(&root, &files, Some("http://127.0.0.1:9")).expect("nothing to fetch");

    // A file that does not match its pin is refused and nothing is left behind.
    let mut wrong = file("wrong/file.txt", b"the real content");
    wrong.size = 8;
    let err = download(&root, &[wrong], Some(&base))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the pinned file"), "{err}");
    let files_now = left_over(&root);
    assert_eq!(files_now.len(), 2, "{files_now:?}");

    // Missing on the server / no server: clear errors.
    let err = download(&root, &[file("gone.txt", b"x")], Some(&base))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot download"), "{err}");
    assert_eq!(left_over(&root).len(), 2);
}
