//! `opta-lmx service`: runs the server as a system service that starts at boot and comes
//! back after a crash: a launchd daemon (`com.opta.lmx`) on macOS, a systemd unit on Linux.
//! The files are rendered here (and printed by `--dry-run`); install writes them and asks
//! launchctl or systemctl to start them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

/// launchd's label and the base name of every file the service uses.
pub const LABEL: &str = "com.opta.lmx";
/// The systemd unit's name.
pub const UNIT: &str = "opta-lmx.service";
/// Where a system service's logs and audit file go.
pub const LOG_DIR: &str = "/var/log/opta-lmx";

/// `service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write the service file, enable it and start it.
    Install(InstallArgs),
    /// Stop the service and remove its file.
    Uninstall(Target),
    /// Ask launchd or systemd how the service is doing.
    Status(Target),
    /// Show the service's logs (follow with -f).
    Logs {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        follow: bool,
    },
}

/// Which service manager and scope.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// A per-user service (launchd agent, `systemctl --user`) instead of a system one.
    #[arg(long)]
    pub user: bool,
    /// The service manager; default this platform's.
    #[arg(long, value_enum, default_value_t = Manager::native())]
    pub manager: Manager,
}

/// Flags of `service install`.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print the file that would be installed, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Config file the service reads (default ~/.opta-lmx/config.yaml of the installing user;
    /// created if missing).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run a system service as this (dedicated) account; created on Linux if missing.
    #[arg(long)]
    pub run_as: Option<String>,
    /// The binary to run (default this one).
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// A service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Manager {
    Launchd,
    Systemd,
}

impl Manager {
    fn native() -> Self {
        if cfg!(target_os = "macos") {
            Self::Launchd
        } else {
            Self::Systemd
        }
    }
}

/// What a service file says, whichever manager reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub user_scope: bool,
    pub run_as: Option<String>,
    /// Directory for stdout/stderr (launchd) and the audit file.
    pub log_dir: PathBuf,
}

/// Open files the service may hold: one per client connection, model file and download.
const OPEN_FILES: u32 = 65536;

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

impl ServiceSpec {
    /// The spec for `args`, with paths made absolute (a service has no working directory).
    pub fn from_args(args: &InstallArgs) -> anyhow::Result<Self> {
        let binary = match &args.binary {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("cannot find this program's path")?,
        };
        let binary = absolute(&binary)?;
        let config = absolute(
            &args
                .config
                .clone()
                .unwrap_or_else(opta_lmx::config::default_config_path),
        )?;
        let user_scope = args.target.user;
        if user_scope && args.run_as.is_some() {
            bail!("--run-as is for system services; a --user service runs as you");
        }
        let log_dir = match (args.target.manager, user_scope) {
            (_, false) => PathBuf::from(LOG_DIR),
            (Manager::Launchd, true) => home().join("Library/Logs/opta-lmx"),
            (Manager::Systemd, true) => home().join(".opta-lmx/logs"),
        };
        Ok(Self {
            binary,
            config,
            user_scope,
            run_as: args.run_as.clone(),
            log_dir,
        })
    }

    fn audit_file(&self) -> PathBuf {
        self.log_dir.join("audit.jsonl")
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot make {} absolute", p.display()))
}

/// Escapes text for an XML element.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The launchd property list: started at load (boot or login), restarted when it exits
/// with a failure (a clean stop stays stopped), logs under the log directory.
pub fn launchd_plist(spec: &ServiceSpec) -> String {
    let s = |p: &Path| xml(&p.display().to_string());
    let user = match &spec.run_as {
        Some(u) => format!("\n  <key>UserName</key>\n  <string>{}</string>", xml(u)),
        None => String::new(),
    };
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{LABEL}</string>
  <key>ProgramArguments</key>
  <array>
    <string>{bin}</string>
    <string>serve</string>
    <string>--config</string>
    <string>{config}</string>
  </array>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>ThrottleInterval</key>
  <integer>5</integer>
  <key>ProcessType</key>
  <string>Interactive</string>
  <key>StandardOutPath</key>
  <string>{log}/stdout.log</string>
  <key>StandardErrorPath</key>
  <string>{log}/stderr.log</string>
  <key>EnvironmentVariables</key>
  <dict>
    <key>OPTA_LMX_AUDIT_FILE</key>
    <string>{audit}</string>
  </dict>
  <key>SoftResourceLimits</key>
  <dict>
    <key>NumberOfFiles</key>
    <integer>{OPEN_FILES}</integer>
  </dict>
  <key>HardResourceLimits</key>
  <dict>
    <key>NumberOfFiles</key>
    <integer>{OPEN_FILES}</integer>
  </dict>{user}
</dict>
</plist>
"#,
        bin = s(&spec.binary),
        config = s(&spec.config),
        log = s(&spec.log_dir),
        audit = s(&spec.audit_file()),
    )
}

/// Quotes a path for a systemd command line or assignment.
fn sd_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\\')
    {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

/// The systemd unit: `Type=notify` (the server says READY once its port is bound and its
/// start-up models are loaded), restarted on failure, hardened without the options that
/// would break model loading.
pub fn systemd_unit(spec: &ServiceSpec) -> String {
    let mut unit = format!(
        "[Unit]
Description=opta-lmx: OpenAI-compatible inference server for local models
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={bin} serve --config {config}
Restart=on-failure
RestartSec=2
# Loading large models at start can take minutes; stopping drains requests for up to
# server.drain_seconds (60 s unless changed).
TimeoutStartSec=900
TimeoutStopSec=120
LimitNOFILE={OPEN_FILES}
Environment=OPTA_LMX_AUDIT_FILE={audit}
",
        bin = sd_quote(&spec.binary),
        config = sd_quote(&spec.config),
        audit = sd_quote(&spec.audit_file()),
    );
    if !spec.user_scope {
        if let Some(u) = &spec.run_as {
            unit.push_str(&format!("User={u}\nGroup={u}\n"));
        }
        unit.push_str(
            "LogsDirectory=opta-lmx
# Hardening. Left out on purpose: MemoryDenyWriteExecute (the MLX worker's Python and some
# BLAS kernels need writable code pages), PrivateDevices (GPU device nodes), ProtectHome
# (models and config live under a home directory by default).
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
",
        );
    }
    unit.push_str(&format!(
        "\n[Install]\nWantedBy={}\n",
        if spec.user_scope {
            "default.target"
        } else {
            "multi-user.target"
        }
    ));
    unit
}

/// Where the service file goes.
pub fn file_path(manager: Manager, user: bool) -> PathBuf {
    match (manager, user) {
        (Manager::Launchd, false) => PathBuf::from(format!("/Library/LaunchDaemons/{LABEL}.plist")),
        (Manager::Launchd, true) => home().join(format!("Library/LaunchAgents/{LABEL}.plist")),
        (Manager::Systemd, false) => PathBuf::from(format!("/etc/systemd/system/{UNIT}")),
        (Manager::Systemd, true) => home().join(format!(".config/systemd/user/{UNIT}")),
    }
}

/// launchd's domain for the scope: `system` or the user's GUI session.
fn launchd_domain(user: bool) -> String {
    if user {
        // SAFETY: getuid has no preconditions and cannot fail.
        format!("gui/{}", unsafe { libc::getuid() })
    } else {
        "system".into()
    }
}

/// Runs a command, failing with its name when it fails.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn systemctl(user: bool, args: &[&str]) -> anyhow::Result<()> {
    let mut all = Vec::new();
    if user {
        all.push("--user");
    }
    all.extend_from_slice(args);
    run("systemctl", &all)
}

/// Carries out a `service` subcommand.
pub fn dispatch(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Install(args) => install(&args),
        ServiceCommand::Uninstall(t) => {
            let path = file_path(t.manager, t.user);
            match t.manager {
                Manager::Launchd => {
                    let target = format!("{}/{LABEL}", launchd_domain(t.user));
                    // Not loaded is fine: the goal is "not running, not installed".
                    let _ = run("launchctl", &["bootout", &target]);
                }
                Manager::Systemd => {
                    let _ = systemctl(t.user, &["disable", "--now", UNIT]);
                }
            }
            match std::fs::remove_file(&path) {
                Ok(()) => println!("removed {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("{} was not installed", path.display())
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
            }
            if t.manager == Manager::Systemd {
                systemctl(t.user, &["daemon-reload"])?;
            }
            Ok(())
        }
        ServiceCommand::Status(t) => match t.manager {
            Manager::Launchd => run(
                "launchctl",
                &["print", &format!("{}/{LABEL}", launchd_domain(t.user))],
            ),
            Manager::Systemd => systemctl(t.user, &["status", "--no-pager", UNIT]),
        },
        ServiceCommand::Logs { target: t, follow } => match t.manager {
            Manager::Launchd => {
                let dir = if t.user {
                    home().join("Library/Logs/opta-lmx")
                } else {
                    PathBuf::from(LOG_DIR)
                };
                let err = dir.join("stderr.log").display().to_string();
                let mut args = vec!["-n", "200"];
                if follow {
                    args.push("-F");
                }
                args.push(&err);
                run("tail", &args)
            }
            Manager::Systemd => {
                let mut args = vec!["--no-pager", "-n", "200"];
                args.push(if t.user { "--user-unit" } else { "-u" });
                args.push(UNIT);
                if follow {
                    args.push("-f");
                }
                run("journalctl", &args)
            }
        },
    }
}

fn install(args: &InstallArgs) -> anyhow::Result<()> {
    let spec = ServiceSpec::from_args(args)?;
    let t = &args.target;
    let text = match t.manager {
        Manager::Launchd => launchd_plist(&spec),
        Manager::Systemd => systemd_unit(&spec),
    };
    if args.dry_run {
        print!("{text}");
        return Ok(());
    }
    if !spec.config.exists() {
        if let Some(dir) = spec.config.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // The service may run with another home: pin the installing user's models folder.
        let models = opta_lmx::config::default_models_dir();
        std::fs::write(
            &spec.config,
            format!(
                "# opta-lmx configuration (see README). Written by `opta-lmx service install`.\nmodels:\n  directory: {}\n",
                serde_json::to_string(&models.display().to_string())?
            ),
        )
        .with_context(|| format!("cannot write {}", spec.config.display()))?;
        println!("wrote {}", spec.config.display());
    }
    std::fs::create_dir_all(&spec.log_dir).with_context(|| {
        format!(
            "cannot create {} (run as root for a system service, or use --user)",
            spec.log_dir.display()
        )
    })?;
    if let (Some(user), Manager::Systemd, false) = (&spec.run_as, t.manager, t.user) {
        let exists = Command::new("id")
            .arg(user)
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            run(
                "useradd",
                &[
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ],
            )?;
        }
    }
    let path = file_path(t.manager, t.user);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    match t.manager {
        Manager::Launchd => {
            let domain = launchd_domain(t.user);
            let _ = run("launchctl", &["bootout", &format!("{domain}/{LABEL}")]);
            run(
                "launchctl",
                &["bootstrap", &domain, &path.display().to_string()],
            )?;
        }
        Manager::Systemd => {
            systemctl(t.user, &["daemon-reload"])?;
            systemctl(t.user, &["enable", "--now", UNIT])?;
        }
    }
    println!("opta-lmx is installed and starting; `opta-lmx service status` shows it");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(user: bool) -> ServiceSpec {
        ServiceSpec {
            binary: PathBuf::from("/opt/opta lmx/bin/opta-lmx"),
            config: PathBuf::from("/etc/opta-lmx/config.yaml"),
            user_scope: user,
            run_as: (!user).then(|| "opta-lmx".to_string()),
            log_dir: PathBuf::from(LOG_DIR),
        }
    }

    #[test]
    fn unit_quotes_paths_and_hardens_system_services_only() {
        let system = systemd_unit(&spec(false));
        assert!(
            system.contains(
                "ExecStart=\"/opt/opta lmx/bin/opta-lmx\" serve --config /etc/opta-lmx/config.yaml"
            ),
            "{system}"
        );
        assert!(system.contains("Type=notify"));
        assert!(system.contains("User=opta-lmx"));
        assert!(system.contains("WantedBy=multi-user.target"));
        assert!(system.contains("ProtectSystem=full"));
        assert!(!system.contains("MemoryDenyWriteExecute=yes"));
        let user = systemd_unit(&spec(true));
        assert!(user.contains("WantedBy=default.target"));
        assert!(!user.contains("User="));
        assert!(!user.contains("ProtectSystem"));
    }

    #[test]
    fn plist_escapes_xml() {
        let mut s = spec(false);
        s.config = PathBuf::from("/tmp/a&b<c>.yaml");
        let p = launchd_plist(&s);
        assert!(
            p.contains("<string>/tmp/a&amp;b&lt;c&gt;.yaml</string>"),
            "{p}"
        );
        assert!(p.contains("<key>UserName</key>\n  <string>opta-lmx</string>"));
    }
}
