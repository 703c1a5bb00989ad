//! `channelmesh token`: mints a client token signed with the HS256 secret, for trying things
//! out.

use gateway::config::ENV_JWT_SECRET;
use mesh_core::{ChannelId, Identity, TeamId, TokenKey, UserId};

use crate::dev::mesh::unix_now;

/// The `token` command's flags.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[arg(long)]
    user: String,
    #[arg(long)]
    team: String,
    /// A channel the token admits; repeat for more.
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

/// Prints a token for `args`, signed with the secret in `CHANNELMESH_JWT_SECRET`.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let secret = admin_server::config::required_env(ENV_JWT_SECRET)?;
    let now = unix_now();
    let identity = Identity {
        user: UserId::new(&args.user)?,
        team: TeamId::new(&args.team)?,
        name: args.name,
        channels: args
            .channels
            .iter()
            .map(|c| ChannelId::new(c))
            .collect::<Result<_, _>>()?,
        expires_at: now + args.ttl,
        jti: None,
    };
    println!(
        "{}",
        TokenKey::hs256(secret.as_bytes()).mint(&identity, now)?
    );
    Ok(())
}
