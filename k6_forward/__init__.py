"""k6-forward: k6 --out json lines -> local per-(series, bucket) partials -> the servers."""
