"""td-replay: replay recorded k6 JSON streams as N simulated load generators, then verify
what the servers stored against what was sent. See docs/REPLAY.md."""
