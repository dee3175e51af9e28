//! The plugin sandbox's instance pool (wasmtime's pooling allocator), read at each
//! scrape: what is in use, and what freed slots keep resident for the next instance.
//!
//! A freed linear-memory slot keeps its low pages resident (`KEEP_RESIDENT` in
//! `plugin/engine.rs`) and stays "warm" for the plugin that used it, up to
//! `plugin_warm_slots` warm slots (docs/configuration.md). That memory is in
//! `process_resident_memory_bytes` and is not a leak; these gauges say how much of it
//! there is.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

pub struct PluginPoolCollector(pub wasmtime::PoolingAllocatorMetrics);

impl std::fmt::Debug for PluginPoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginPoolCollector")
    }
}

impl Collector for PluginPoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let gauges: [(&str, &str, i64); 5] = [
            (
                "plugin_instances",
                "Plugin instances running now (component instances in the pool)",
                m.component_instances() as i64,
            ),
            (
                "plugin_memories",
                "Plugin linear memories in use now",
                m.memories() as i64,
            ),
            (
                "plugin_warm_memories",
                "Freed plugin memory slots kept warm for the plugin that used them (at most plugin_warm_slots)",
                i64::from(m.unused_warm_memories()),
            ),
            (
                "plugin_warm_memory_resident_bytes",
                "Bytes the warm plugin memory slots keep resident for their next instance",
                m.unused_memory_bytes_resident() as i64,
            ),
            (
                "plugin_warm_stacks",
                "Freed plugin call stacks kept for reuse",
                i64::from(m.unused_warm_stacks()),
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}
