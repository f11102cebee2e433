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
