//! The model is loaded once, in the master, and shared copy-on-write: one more worker must
//! cost a few MiB of PSS, never the model's size (~87 MiB for all-MiniLM-L6-v2, ~418 MiB for
//! all-mpnet-base-v2). (`make bench-memory` reports the figures for 1, 2 and 4 workers; this
//! test guards the property for both bundled models.)

mod support;

use std::path::Path;

use support::*;

/// Total PSS (KiB) of master + workers after `requests` requests.
fn pss_after(model: &Path, workers: usize, requests: usize) -> (u64, Vec<Memory>) {
    let server = Server::start(&config_for(model, &format!("workers = {workers}")), workers);
    let mut conn = Connection::open(server.port).unwrap();
    for _ in 0..requests {
        let r = conn
            .send(
                "POST",
                "/cluster",
                &[("Content-Type", "application/json")],
                seed_body().as_bytes(),
                true,
            )
            .unwrap();
        assert_eq!(r.status, 200);
    }
    total_pss_kib(server.pid())
}

fn extra_worker_costs_a_few_mib(model: &Path) {
    let (one, _) = pss_after(model, 1, 100);
    let (three, mems) = pss_after(model, 3, 100);
    let marginal_mib = (three.saturating_sub(one)) as f64 / 2.0 / 1024.0;
    eprintln!(
        "{}: total PSS: 1 worker {one} KiB, 3 workers {three} KiB; +{marginal_mib:.2} MiB/worker",
        model.display()
    );
    assert!(
        marginal_mib <= 8.0,
        "each extra worker adds {marginal_mib:.1} MiB of PSS (target <= 8): {mems:?}"
    );
    // Workers' private memory is activations and buffers, not weights.
    for m in &mems[1..] {
        assert!(
            m.uss() < 32 * 1024,
            "a worker has {} KiB of private memory",
            m.uss()
        );
    }
}

#[test]
fn an_extra_worker_costs_a_few_mib_not_a_model() {
    extra_worker_costs_a_few_mib(&model_dir());
}

#[test]
fn an_extra_all_mpnet_base_v2_worker_costs_a_few_mib_too() {
    extra_worker_costs_a_few_mib(&mpnet_dir());
}

/// The packed weights ask for transparent huge pages (`region.rs`): where the kernel gives
/// them (`madvise` or `always`), the master holds all-MiniLM-L6-v2's ~40 MiB of encoder
/// weights on them and the workers map the very same pages, still shared after requests.
/// With `never` there is nothing to check but that the server serves, which the other
/// tests do.
#[test]
fn the_packed_weights_are_shared_on_huge_pages_where_the_kernel_gives_them() {
    let setting =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !(setting.contains("[madvise]") || setting.contains("[always]")) {
        eprintln!("transparent huge pages are off here ({setting:?}): nothing to check");
        return;
    }
    let server = Server::start(&config_for(&model_dir(), "workers = 2"), 2);
    for _ in 0..10 {
        assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
    }
    let mut pids = vec![server.pid()];
    pids.extend(server.worker_pids());
    assert_eq!(pids.len(), 3, "{pids:?}");
    for pid in pids {
        let memory = memory_of(pid);
        let (huge, private) = (memory.anon_huge_pages, memory.uss());
        eprintln!("pid {pid}: AnonHugePages {huge} KiB, private {private} KiB");
        // 21 huge pages measured (42 MiB); a few may fall back to 4 KiB pages on a host
        // short of free 2 MiB blocks.
        assert!(huge >= 32 * 1024, "pid {pid}: {huge} KiB on huge pages");
        if pid != server.pid() {
            // Mapped, not copied: a worker's own memory is far below the weights' 42 MiB.
            assert!(private < 32 * 1024, "pid {pid}: {private} KiB private");
        }
    }
}
