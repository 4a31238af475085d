//! The dashboard's stylesheet and script, compiled into the binary (no CDN, no build step).

/// Inlined into every page's `<style>`.
pub(crate) const CSS: &str = include_str!("assets/dashboard.css");
/// Inlined into every page's `<script>`: refreshes the overview and draws the chart.
pub(crate) const JS: &str = include_str!("assets/dashboard.js");
