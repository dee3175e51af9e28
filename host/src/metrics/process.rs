//! Process metrics under the names every Prometheus client library uses
//! (`process_resident_memory_bytes`, `process_cpu_seconds_total`, ...), read from
//! `/proc/self` at each scrape, and `nnserve_build_info{version,backends}`.
//!
//! Written here rather than taken from a crate: `prometheus-client` has no process
//! collector, and the `procfs` crate would bring a large API for five numbers from two
//! files whose format the kernel keeps stable (proc(5)).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub struct ProcessCollector;

/// What one scrape reads.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: i64,
    pub virtual_bytes: i64,
    pub threads: i64,
    pub start_time_seconds: f64,
    pub open_fds: i64,
    pub max_fds: i64,
}

/// Parses `/proc/self/stat` (proc(5)): the fields after the command's closing `)`.
pub fn parse_stat(stat: &str, ticks: f64, page: i64, boot_time: f64) -> Option<Sample> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): field N is f[N - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<f64>().ok();
    Some(Sample {
        cpu_seconds: (num(14)? + num(15)?) / ticks,
        threads: num(20)? as i64,
        start_time_seconds: boot_time + num(22)? / ticks,
        virtual_bytes: num(23)? as i64,
        resident_bytes: num(24)? as i64 * page,
        ..Default::default()
    })
}

/// `btime` of `/proc/stat`: when the machine booted, seconds since the epoch.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

pub fn sample() -> Option<Sample> {
    // SAFETY: sysconf has no memory effects.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut s = parse_stat(&stat, ticks.max(1) as f64, page.max(1) as i64, boot_time()?)?;
    s.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        s.max_fds = limit.rlim_cur.min(i64::MAX as u64) as i64;
    }
    Some(s)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = sample() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, ConstGauge<i64>); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size, bytes",
                ConstGauge::new(s.resident_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size, bytes",
                ConstGauge::new(s.virtual_bytes),
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                ConstGauge::new(s.open_fds),
            ),
            (
                "process_max_fds",
                "The limit of open file descriptors",
                ConstGauge::new(s.max_fds),
            ),
            ("process_threads", "OS threads", ConstGauge::new(s.threads)),
        ];
        for (name, help, g) in gauges {
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let start = ConstGauge::new(s.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the epoch, seconds",
            None,
            start.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The backends this binary was built with, as `nnserve_build_info`'s label says them.
pub fn backends() -> &'static str {
    if cfg!(feature = "tensorflow") {
        "torchscript,tensorflow"
    } else {
        "torchscript"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_by_their_numbers() {
        // A command with spaces and a parenthesis: the fields count from the last `)`.
        let stat = "4242 (nn serve) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 7 0 1000 123456789 3000 18446744073709551615";
        let s = parse_stat(stat, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 3000 * 4096);
        let live = sample().expect("this process's own /proc");
        assert!(live.resident_bytes > 0 && live.threads >= 1 && live.open_fds >= 3);
    }
}
