//! `GET /metrics`: Prometheus text for the whole server, read from the shared scoreboard, so
//! whichever worker answers reports every worker's requests, and counters outlive recycled
//! workers (no prometheus_client multiprocess directory to manage).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::routes::Route;
use crate::protocol::{RestartReason, WorkerSlot, WorkerState};
use crate::shared_metrics::{
    Histogram, SharedBoard, BATCH_BUCKETS, LATENCY_BUCKETS, PASS_BUCKETS, STATUSES,
};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn render(board: &SharedBoard) -> String {
    let m = board.metrics;
    let mut out = String::with_capacity(16 * 1024);

    header(
        &mut out,
        "forkserve_build_info",
        "gauge",
        "Always 1; the labels say which forkserve build serves.",
    );
    let _ = writeln!(
        out,
        "forkserve_build_info{{version=\"{}\",profile=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    header(
        &mut out,
        "process_start_time_seconds",
        "gauge",
        "When the master process started, in seconds since the Unix epoch.",
    );
    let _ = writeln!(
        out,
        "process_start_time_seconds {:.3}",
        m.started_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0
    );

    header(
        &mut out,
        "forkserve_requests_total",
        "counter",
        "HTTP requests answered, by route and status.",
    );
    for (r, route) in Route::ALL.iter().map(|r| r.label()).enumerate() {
        for (s, status) in STATUSES.iter().enumerate() {
            let n = m.requests[r][s].load(Ordering::Relaxed);
            if n > 0 {
                let status = if *status == 0 {
                    "other".to_string()
                } else {
                    status.to_string()
                };
                let _ = writeln!(
                    out,
                    "forkserve_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
    }

    header(
        &mut out,
        "forkserve_request_duration_seconds",
        "histogram",
        "Time from request to response, by route.",
    );
    for (r, route) in Route::ALL.iter().map(|r| r.label()).enumerate() {
        if m.latency[r].count.load(Ordering::Relaxed) > 0 {
            histogram(
                &mut out,
                "forkserve_request_duration_seconds",
                &format!("route=\"{route}\","),
                &m.latency[r],
                &LATENCY_BUCKETS,
            );
        }
    }

    header(
        &mut out,
        "forkserve_inference_batch_size",
        "histogram",
        "Sentences per forward pass.",
    );
    histogram(
        &mut out,
        "forkserve_inference_batch_size",
        "",
        &m.batch_size,
        &BATCH_BUCKETS,
    );
    header(
        &mut out,
        "forkserve_inference_batch_requests",
        "histogram",
        "Requests sharing a forward pass (batching across requests).",
    );
    histogram(
        &mut out,
        "forkserve_inference_batch_requests",
        "",
        &m.batch_requests,
        &BATCH_BUCKETS,
    );
    header(
        &mut out,
        "forkserve_inference_duration_seconds",
        "histogram",
        "Time per forward pass, from tokens to pooled vectors.",
    );
    histogram(
        &mut out,
        "forkserve_inference_duration_seconds",
        "",
        &m.pass_duration,
        &PASS_BUCKETS,
    );
    header(
        &mut out,
        "forkserve_queue_duration_seconds",
        "histogram",
        "Time from a request being queued for its worker's compute thread to its first forward pass, tokenizing included.",
    );
    histogram(
        &mut out,
        "forkserve_queue_duration_seconds",
        "",
        &m.queue_duration,
        &PASS_BUCKETS,
    );
    header(
        &mut out,
        "forkserve_inference_tokens_total",
        "counter",
        "Real tokens run through the model.",
    );
    let _ = writeln!(
        out,
        "forkserve_inference_tokens_total {}",
        m.tokens.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "forkserve_inference_padded_tokens_total",
        "counter",
        "Tokens the forward passes computed: padding included for a backend that pads (candle), the real tokens for the default one, which never pads.",
    );
    let _ = writeln!(
        out,
        "forkserve_inference_padded_tokens_total {}",
        m.padded_tokens.load(Ordering::Relaxed)
    );

    header(
        &mut out,
        "forkserve_worker_restarts_total",
        "counter",
        "Workers replaced, by reason.",
    );
    for reason in RestartReason::ALL {
        let _ = writeln!(
            out,
            "forkserve_worker_restarts_total{{reason=\"{}\"}} {}",
            reason.name(),
            m.restarts(reason)
        );
    }

    header(
        &mut out,
        "forkserve_workers",
        "gauge",
        "Worker processes, by state.",
    );
    for state in [
        WorkerState::Booting,
        WorkerState::Ready,
        WorkerState::Retiring,
        WorkerState::Draining,
    ] {
        let n = board.slots.iter().filter(|s| s.state() == state).count();
        let _ = writeln!(out, "forkserve_workers{{state=\"{}\"}} {n}", state.name());
    }

    per_worker(
        &mut out,
        board,
        "forkserve_worker_pid",
        "Process id of the worker in each scoreboard slot.",
        |slot| slot.pid().max(0) as u64,
    );
    per_worker(
        &mut out,
        board,
        "forkserve_worker_private_memory_bytes",
        "Private memory (USS) of each worker, sampled by the master every second.",
        |slot| slot.private_bytes(),
    );
    per_worker(
        &mut out,
        board,
        "forkserve_worker_requests",
        "Requests answered by each live worker.",
        |slot| slot.requests(),
    );
    per_worker(
        &mut out,
        board,
        "forkserve_worker_in_flight",
        "Requests each live worker is handling now (queued for a forward pass included).",
        |slot| slot.in_flight() as u64,
    );
    per_worker(
        &mut out,
        board,
        "forkserve_worker_queue_depth",
        "Requests waiting for, or in, each live worker's compute thread (503 past max_queue).",
        |slot| slot.queued() as u64,
    );
    out
}

/// A gauge with one sample per live worker, labelled by its scoreboard slot: a replaced
/// worker takes a free slot again, so the series stay as many as the slots in use, however
/// many workers are recycled (`forkserve_worker_pid` says which process a slot holds).
fn per_worker(
    out: &mut String,
    board: &SharedBoard,
    name: &str,
    help: &str,
    value: impl Fn(&WorkerSlot) -> u64,
) {
    header(out, name, "gauge", help);
    for (index, slot) in board
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state() != WorkerState::Free)
    {
        let _ = writeln!(out, "{name}{{worker=\"{index}\"}} {}", value(slot));
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    labels: &str,
    h: &Histogram<N>,
    bounds: &[f64; N],
) {
    let mut cumulative = 0;
    for (i, bound) in bounds.iter().enumerate() {
        cumulative += h.buckets[i].load(Ordering::Relaxed);
        let le = if bound.is_infinite() {
            "+Inf".to_string()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
    }
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let labels = labels.trim_end_matches(',');
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(
        out,
        "{name}_count{braces} {}",
        h.count.load(Ordering::Relaxed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_metrics::{BatchStats, SharedMetrics};

    #[test]
    fn renders_counters_histograms_and_workers() {
        let metrics: &'static SharedMetrics = Box::leak(Box::default());
        let slots: &'static [WorkerSlot] =
            Box::leak(vec![WorkerSlot::default(), WorkerSlot::default()].into_boxed_slice());
        slots[0].reset(1);
        slots[0].set_state(WorkerState::Ready);
        slots[0].set_pid(42);
        slots[0].set_private_bytes(4096);
        slots[0].add_in_flight(1);
        metrics.count_request(Route::Cluster.index(), 200, 0.02);
        metrics.count_request(Route::Cluster.index(), 200, 0.2);
        metrics.count_request(Route::Embed.index(), 422, 0.001);
        metrics.count_batch(&BatchStats {
            sentences: 9,
            requests: 2,
            tokens: 69,
            padded: 81,
            seconds: 0.004,
        });
        metrics.count_queued(0.0002);
        metrics.count_restart(RestartReason::MaxRequests);
        let text = render(&SharedBoard { slots, metrics });
        for line in [
            "forkserve_requests_total{route=\"/cluster\",status=\"200\"} 2",
            "forkserve_requests_total{route=\"/embed\",status=\"422\"} 1",
            "forkserve_request_duration_seconds_bucket{route=\"/cluster\",le=\"0.025\"} 1",
            "forkserve_request_duration_seconds_bucket{route=\"/cluster\",le=\"+Inf\"} 2",
            "forkserve_request_duration_seconds_count{route=\"/cluster\"} 2",
            "forkserve_inference_batch_size_bucket{le=\"16\"} 1",
            "forkserve_inference_tokens_total 69",
            "forkserve_inference_duration_seconds_bucket{le=\"0.0025\"} 0",
            "forkserve_inference_duration_seconds_bucket{le=\"0.005\"} 1",
            "forkserve_inference_duration_seconds_sum 0.004",
            "forkserve_queue_duration_seconds_bucket{le=\"0.0005\"} 1",
            "forkserve_worker_restarts_total{reason=\"max_requests\"} 1",
            "forkserve_workers{state=\"ready\"} 1",
            "forkserve_worker_private_memory_bytes{worker=\"0\"} 4096",
            "forkserve_worker_pid{worker=\"0\"} 42",
            "forkserve_worker_in_flight{worker=\"0\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
