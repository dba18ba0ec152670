"""non_td_server: sums counters, rates and gauges per (series, bucket)."""
