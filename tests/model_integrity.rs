//! A damaged model never serves: weights with NaN or infinity, or weights that load but give
//! zero or identical vectors (an interrupted copy into a preallocated file), are refused at
//! start (exit 2) and on HUP (the old model keeps serving); `model.sha256` pins the file.
//! The real binary, on copies of the real model.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::*;

/// Overwrite the last tenth of `dir/model.safetensors` with `byte`, through a new file renamed
/// over the old one (as a deployment swaps a model in; the mapping of a running server is
/// never truncated under it).
fn damage_tail(dir: &Path, byte: u8) {
    let path = dir.join("model.safetensors");
    let mut data = std::fs::read(&path).unwrap();
    let from = data.len() - data.len() / 10;
    data[from..].fill(byte);
    let tmp = dir.join("model.safetensors.tmp");
    std::fs::write(&tmp, &data).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

fn copy_of_model(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    copy_dir(&model_dir(), &dir.path("model"));
    dir
}

fn refused_at_start(model: &Path, extra: &str) -> String {
    let mut server = Server::spawn(&config_for(model, extra), &[]);
    let status = server.wait_exit(Duration::from_secs(60));
    let log = server.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    log
}

#[test]
fn weights_of_0xff_bytes_are_refused_at_start() {
    let dir = copy_of_model("nan-model");
    damage_tail(&dir.path("model"), 0xFF);
    let log = refused_at_start(&dir.path("model"), "workers = 1");
    assert!(
        log.contains("must be finite") && log.contains("NaN"),
        "{log}"
    );
}

#[test]
fn zeroed_weights_are_refused_at_start() {
    let dir = copy_of_model("zero-model");
    damage_tail(&dir.path("model"), 0);
    let log = refused_at_start(&dir.path("model"), "workers = 1");
    assert!(log.contains("the weights are corrupt"), "{log}");
}

#[test]
fn a_damaged_model_on_hup_keeps_the_old_one_serving() {
    let dir = copy_of_model("hup-model");
    let model = dir.path("model");
    let server = Server::start(&config_for(&model, "workers = 1"), 1);
    let body = json!({"inputs": ["The Art of Dog Walking"]}).to_string();
    let before = server.post_json("/embed", &body);
    assert_eq!(before.status, 200);
    for (n, byte) in [0u8, 0xFF].into_iter().enumerate() {
        damage_tail(&model, byte);
        server.signal("HUP");
        let log = server.wait_log("the refused reload", Duration::from_secs(60), |l| {
            l.matches("reload failed").count() > n
        });
        assert!(log.contains("still serving the previous model"), "{log}");
        let after = server.post_json("/embed", &body);
        assert_eq!(after.status, 200);
        assert_eq!(
            after.json(),
            before.json(),
            "the answer changed after byte {byte:#x}"
        );
    }
    // No worker was rolled onto the damaged model.
    assert_eq!(
        server.metric("forkserve_worker_restarts_total{reason=\"reload\"}"),
        0.0
    );
}

#[test]
fn model_sha256_pins_the_weights() {
    let out = std::process::Command::new("sha256sum")
        .arg(model_dir().join("model.safetensors"))
        .output()
        .unwrap();
    let digest = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let pinned = |sha: &str| {
        format!(
            "bind = \"127.0.0.1:0\"\nworkers = 1\n[model]\npath = {:?}\nsha256 = {sha:?}\n",
            model_dir().display().to_string()
        )
    };
    let wrong = format!("{}0", &digest[..63]);
    let mut refused = Server::spawn(&pinned(&wrong), &[]);
    assert_eq!(refused.wait_exit(Duration::from_secs(60)).code(), Some(2));
    let log = refused.log_text();
    assert!(
        log.contains("model.sha256") && log.contains(&digest),
        "{log}"
    );
    // The right digest starts.
    let server = Server::start(&pinned(&digest), 1);
    assert_eq!(server.get("/health").status, 200);
}
