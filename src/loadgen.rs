//! `channelmesh bench …`: runs the load generator, the `channelmesh-loadgen` binary (crate
//! `bench/loadgen`), with the same arguments. The product does not link the load generator; it
//! only finds and runs it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// Env var: the load generator's path, instead of `channelmesh-loadgen` beside this binary.
pub const ENV_LOADGEN: &str = "CHANNELMESH_LOADGEN";
/// The load generator's file name, beside this binary.
pub const LOADGEN_BIN: &str = "channelmesh-loadgen";
/// What the load generator calls itself in usage lines, as the subcommand it stands for.
const ARG0: &str = "channelmesh bench";

/// Where the load generator is: `$CHANNELMESH_LOADGEN`, else `channelmesh-loadgen` in this
/// executable's directory.
pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(ENV_LOADGEN).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("locating the channelmesh binary: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?;
    Ok(dir.join(LOADGEN_BIN))
}

/// Runs `channelmesh-loadgen ARGS...` in place of this process: `global` (the `channelmesh`
/// flags given before `bench`, which it takes too) then `args` verbatim, with this process's
/// stdio and environment. On Unix it replaces this process (same pid, signals and exit
/// status go straight to it); elsewhere it waits for it and exits with its status.
pub fn run(global: Vec<String>, args: Vec<OsString>) -> ExitCode {
    match exec(global, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn exec(global: Vec<String>, args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let path = path()?;
    if !path.is_file() {
        anyhow::bail!(
            "`channelmesh bench` runs the load generator, {LOADGEN_BIN}, which is not at {}: \
             build it with `cargo build --release -p channelmesh-loadgen` (it lands beside \
             channelmesh), or set {ENV_LOADGEN} to its path",
            path.display()
        );
    }
    let mut command = std::process::Command::new(&path);
    command.args(global).args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Only returns if the exec failed.
        let error = command.arg0(ARG0).exec();
        anyhow::bail!("running {}: {error}", path.display());
    }
    #[cfg(not(unix))]
    {
        let status = command
            .status()
            .map_err(|e| anyhow::anyhow!("running {}: {e}", path.display()))?;
        Ok(status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .map_or(ExitCode::FAILURE, ExitCode::from))
    }
}
