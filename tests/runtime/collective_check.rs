//! The `fmoec-collective-check` binary on in-process ranks: every check passes, a
//! skipped barrier becomes a timeout that names the group, and bandwidth lines appear.
//! (On GPUs the same binary runs over NCCL: `fmoec-collective-check --gpus 2`.)

use std::process::Command;

fn check(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fmoec-collective-check"))
        .args(args)
        .output()
        .expect("the check binary runs");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn every_check_passes_on_four_in_process_ranks_with_two_expert_groups() {
    let (ok, text) = check(&[
        "--device",
        "cpu",
        "--ranks",
        "4",
        "--expert-group",
        "2",
        "--bench-mib",
        "1",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("ALL PASS"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    for rank in 0..4 {
        assert!(
            text.contains(&format!(
                "[rank {rank}] PASS expert exchange equals single rank (f64"
            )),
            "{text}"
        );
    }
    assert!(
        text.contains("BENCH all_to_all_v 2 ranks 1 MiB/rank"),
        "{text}"
    );
    assert!(
        text.contains("BENCH all_reduce_sum 4 ranks 1 MiB/rank"),
        "{text}"
    );
}

#[test]
fn a_skipped_barrier_times_out_naming_the_group_and_call_site() {
    let (ok, text) = check(&[
        "--device",
        "cpu",
        "--ranks",
        "2",
        "--no-bench",
        "--check-timeout",
        "--timeout-secs",
        "1",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("[rank 0] PASS timeout names the group (after")
            && text.contains("data group [0,1]: barrier at \"timeout check\": timed out after 1s waiting for rank 1"),
        "{text}"
    );
}

#[test]
fn bad_arguments_are_errors() {
    let (ok, text) = check(&["--device", "tpu"]);
    assert!(
        !ok && text.contains("--device must be `cpu` or `cuda`"),
        "{text}"
    );
    let (ok, text) = check(&["--device", "cpu", "--iters", "5"]);
    assert!(
        !ok && text.contains("--iters must be at least 20"),
        "{text}"
    );
    let (ok, text) = check(&["--device", "cpu", "--ranks", "4", "--expert-group", "3"]);
    assert!(!ok && text.contains("does not divide"), "{text}");
}

/// The same checks on four processes connected over TCP (the transport of CPU ranks that do
/// not share a process, on one machine or several), and the timeout check across processes.
#[test]
fn every_check_passes_on_four_processes_over_tcp() {
    let (ok, text) = check(&[
        "--device",
        "cpu",
        "--ranks",
        "4",
        "--processes",
        "--expert-group",
        "2",
        "--bench-mib",
        "1",
    ]);
    assert!(ok, "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    for rank in 0..4 {
        assert!(
            text.contains(&format!("[rank {rank}] ALL PASS"))
                && text.contains(&format!(
                    "[rank {rank}] PASS expert exchange equals single rank (f64"
                )),
            "{text}"
        );
    }
    assert!(
        text.contains("[rank 0] BENCH all_reduce_sum 4 ranks 1 MiB/rank"),
        "{text}"
    );
    let (ok, text) = check(&[
        "--device",
        "cpu",
        "--ranks",
        "2",
        "--processes",
        "--no-bench",
        "--check-timeout",
        "--timeout-secs",
        "1",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("[rank 0] PASS timeout names the group (after")
            && text.contains("data group [0,1]: barrier at \"timeout check\": timed out after 1s waiting for rank 1"),
        "{text}"
    );
}

#[test]
fn fastermoe_checks_pass_and_its_bench_rows_run() {
    // The smart schedule and shadowing against the single-rank run, then the rows a machine
    // with several GPUs measures (`--gpus 4 --bench-moe S1,F0`), here on a tiny shape.
    let (ok, text) = check(&[
        "--device",
        "cpu",
        "--ranks",
        "4",
        "--no-bench",
        "--bench-moe",
        "tiny",
    ]);
    assert!(ok, "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    for rank in 0..4 {
        assert!(
            text.contains(&format!(
                "[rank {rank}] PASS expert exchange in 4 chunks with expert 0 shadowed equals single rank (f64"
            )),
            "{text}"
        );
    }
    for variant in [
        "plain",
        "chunks(2)",
        "chunks(4)",
        "shadowing",
        "shadowing + chunks(4)",
    ] {
        assert!(
            text.contains("skewed routing (max/mean load ")
                && text.contains(&format!("4 ranks {variant}: median ")),
            "{variant}: {text}"
        );
    }
    let (ok, text) = check(&[
        "--device",
        "cpu",
        "--ranks",
        "2",
        "--no-bench",
        "--bench-moe",
        "S9",
    ]);
    assert!(!ok && text.contains("no shape `S9`"), "{text}");
}
