//! `channelmesh probe`: a health check for containers whose images have no curl.

use std::time::Duration;

/// How long the service may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `probe` command's argument.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    url: String,
}

/// GETs the URL: Ok on a 2xx answer within [`PROBE_TIMEOUT`], else an error with the answer.
pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let url = args.url;
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build()?;
    let response = client.get(&url).send().await?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url}: {status}: {}", body.trim());
    Ok(())
}
