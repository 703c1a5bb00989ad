//! `channelmesh token`: mints a client token as MintToken does — signed with the HS256 secret,
//! with a fresh `jti` and the configured `iss`/`aud` — for trying things out.

use admin_server::Minter;
use admin_server::config::{ClaimArgs, jwt_secret_from_env};
use mesh_core::{ChannelId, Identity, TeamId, UserId};

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
    #[command(flatten)]
    claims: ClaimArgs,
}

/// Prints a token for `args` on stdout, signed with the secret in `CHANNELMESH_JWT_SECRET`
/// (at least 32 bytes), and its `jti` and expiry on stderr, for `ctl revoke`.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let minter = Minter::new(&jwt_secret_from_env()?, args.claims.claims())?;
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
    let minted = minter.mint(identity, now)?;
    println!("{}", minted.token);
    eprintln!(
        "jti {} expires {} (revoke: channelmesh ctl revoke {} --until {})",
        minted.jti, minted.expires_at, minted.jti, minted.expires_at
    );
    Ok(())
}
