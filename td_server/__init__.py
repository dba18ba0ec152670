"""td_server: merges t-digest partials of k6 trend metrics per (series, bucket)."""
