//! The `zapvm run` flags of the exporter, and the [`Exporter`] they make.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use vmm::metrics::{Exporter, MetricsConfig};

/// `--metrics-addr`, `--metrics-file`, `--metrics-interval`.
#[derive(clap::Args, Clone, Debug)]
pub struct MetricsArgs {
    /// Serve the VM's statistics for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9100;
    /// port 0: a free port, printed on standard error).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Write the same text to this file every --metrics-interval and when the VM ends,
    /// atomically (for node_exporter's textfile collector: name it *.prom).
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Seconds between writes of --metrics-file.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub metrics_interval: f64,
}

impl MetricsArgs {
    /// The exporter these flags ask for, its address bound and its file's directory checked
    /// (`None` without --metrics-addr and --metrics-file); a one-line error naming the flag
    /// otherwise. Prints the address it serves on to standard error.
    pub fn exporter(&self, vm_id: &str) -> Result<Option<Exporter>, String> {
        if self.metrics_addr.is_none() && self.metrics_file.is_none() {
            return Ok(None);
        }
        let i = self.metrics_interval;
        if !(i.is_finite() && i > 0.0 && i <= 1e9) {
            return Err(format!("--metrics-interval {i} is not a number of seconds above zero"));
        }
        let addr = self.metrics_addr.as_deref().map(parse_addr).transpose()?;
        let exporter = Exporter::new(MetricsConfig {
            addr,
            file: self.metrics_file.clone(),
            interval: Duration::from_secs_f64(i),
            vm_id: vm_id.to_string(),
        })
        .map_err(|e| e.to_string())?;
        if let Some(addr) = exporter.local_addr() {
            eprintln!("zapvm: metrics at http://{addr}/metrics");
        }
        Ok(Some(exporter))
    }
}

/// `HOST:PORT` (an IP address or a name that resolves) as the first address it names.
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let bad = |why: String| format!("--metrics-addr {text:?}: {why} (want HOST:PORT, e.g. 127.0.0.1:9100)");
    text.to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("names no address".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_why_not() {
        assert_eq!(parse_addr("127.0.0.1:9100").unwrap(), "127.0.0.1:9100".parse().unwrap());
        assert_eq!(parse_addr("[::1]:0").unwrap(), "[::1]:0".parse().unwrap());
        for bad in ["nonsense", "127.0.0.1", "127.0.0.1:99999", ""] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.starts_with("--metrics-addr") && e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}
