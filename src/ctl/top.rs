//! `ctl top`: a refreshing terminal view of the ring manager console's numbers. It sends the
//! process's HTTP token (`--http-token`), which a console off loopback requires.

use anyhow::Context;

/// How long `ctl top` waits for the console to answer.
const TOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Recent epochs `ctl top` lists.
const TOP_EPOCHS: usize = 8;

/// `ctl top`: the console's numbers in the terminal, redrawn every `every` until `cancel`
/// (or printed once). Reads `CONSOLE/api/state`.
pub async fn top(
    console: &str,
    once: bool,
    json: bool,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let url = format!("{}/api/state", console.trim_end_matches('/'));
    let client = reqwest::Client::builder().timeout(TOP_TIMEOUT).build()?;
    loop {
        let fetched = fetch_state(&client, &url).await;
        if once {
            let snapshot = fetched?;
            if json {
                println!("{}", serde_json::to_string(&snapshot)?);
            } else {
                print!("{}", render_top(&snapshot));
            }
            return Ok(());
        }
        match fetched {
            // One JSON line per refresh, for scripts that follow it.
            Ok(snapshot) if json => println!("{}", serde_json::to_string(&snapshot)?),
            // Home the cursor and clear the screen, then draw.
            Ok(snapshot) => print!("\x1b[H\x1b[2J{}", render_top(&snapshot)),
            Err(e) if json => eprintln!("{e:#}"),
            Err(e) => print!("\x1b[H\x1b[2J{e:#}\n(retrying every {every:?})\n"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn fetch_state(
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<ring_manager::console::Snapshot> {
    let mut request = client.get(url);
    // A console off loopback needs the HTTP token; one on loopback ignores it.
    if let Some(token) = mesh_telemetry::access::token() {
        request = request.bearer_auth(token.expose());
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("reading the ring manager console at {url}"))?;
    let status = response.status();
    anyhow::ensure!(
        status != reqwest::StatusCode::UNAUTHORIZED,
        "{url} answered {status}: give ctl the console's token (--http-token or {})",
        mesh_telemetry::access::ENV_HTTP_TOKEN
    );
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    response
        .json()
        .await
        .with_context(|| format!("{url} did not answer a console snapshot"))
}

/// Unix milliseconds as `HH:MM:SS` UTC.
fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// What `ctl top` draws: the epoch, every node, every region, the recent epochs.
pub fn render_top(s: &ring_manager::console::Snapshot) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let ready = if s.ready { "" } else { ", not ready" };
    let _ = writeln!(
        out,
        "ring manager ({}{ready})  epoch {}  {} slots  at {} UTC",
        s.role,
        s.epoch,
        s.slot_count,
        clock(s.at_ms)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<12} {:<9} {:>6} {:>7} {:>8} {:>10} {:>8}  ADDR",
        "NODE", "STATE", "SLOTS", "SHARE", "FOLLOWS", "HEARTBEAT", "PID"
    );
    for n in &s.nodes {
        let share = 100.0 * n.slots as f64 / s.slot_count.max(1) as f64;
        let _ = writeln!(
            out,
            "{:<12} {:<9} {:>6} {:>6.1}% {:>8} {:>7} ms {:>8}  {}",
            n.id, n.state, n.slots, share, n.followed, n.heartbeat_ms, n.pid, n.addr
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<10} {:<14} {:>11}  GATEWAYS",
        "REGION", "STATE", "CONNECTIONS"
    );
    for r in &s.regions {
        let state = if r.draining {
            format!("draining {}/s", r.rate)
        } else {
            "serving".to_string()
        };
        let gateways: Vec<String> = r
            .gateways
            .iter()
            .map(|g| {
                let stale = if g.stale { ", stale" } else { "" };
                format!("{} ({}{stale})", g.id, g.connections)
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<10} {:<14} {:>11}  {}",
            r.region,
            state,
            r.connections,
            gateways.join(" ")
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "RECENT EPOCHS");
    for e in s.epochs.iter().take(TOP_EPOCHS) {
        let moves: Vec<String> = e
            .moves
            .iter()
            .map(|m| {
                let from = m.from.as_deref().unwrap_or("-");
                let to = m.to.as_deref().unwrap_or("-");
                format!("{from}->{to} {}", m.slots)
            })
            .collect();
        let _ = writeln!(
            out,
            "{:>6}  {}  {:>5} moved  {}  [{}]",
            e.epoch,
            clock(e.at_ms),
            e.moved,
            e.cause,
            moves.join(", ")
        );
    }
    out
}
