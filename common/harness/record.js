// A recorded run for the benchmarks: two arrival-rate scenarios (BROWSE and CHECKOUT
// iterations per second, default 500 and 150), four request names, errors, 404s, groups,
// checks and every custom metric type. handleSummary writes k6's summary to SUMMARY_JSON
// when it is set.
import http from 'k6/http';
import { check, group } from 'k6';
import { Trend, Counter, Gauge, Rate } from 'k6/metrics';
const BASE = __ENV.BASE;
const cartValue = new Trend('cart_value');
const orders = new Counter('orders_placed');
const queueDepth = new Gauge('queue_depth');
const paid = new Rate('payment_ok');
export const options = {
  scenarios: {
    browse: { executor: 'constant-arrival-rate', rate: Number(__ENV.BROWSE || 500),
              timeUnit: '1s', duration: __ENV.DUR, preAllocatedVUs: 60, maxVUs: 200,
              exec: 'browse' },
    checkout: { executor: 'constant-arrival-rate', rate: Number(__ENV.CHECKOUT || 150),
                timeUnit: '1s', duration: __ENV.DUR, preAllocatedVUs: 20, maxVUs: 100,
                exec: 'checkout' },
  },
};
export function browse() {
  group('catalog', function () {
    const r = http.get(`${BASE}/api/items`, { tags: { name: 'items' } });
    check(r, { 'items 200': (x) => x.status === 200 });
    http.get(`${BASE}/slow/search`, { tags: { name: 'search' } });
    if (Math.random() < 0.1) http.get(`${BASE}/missing/page`, { tags: { name: 'missing' } });
  });
}
export function checkout() {
  group('checkout', function () {
    const fail = Math.random() < 0.05;
    const r = http.get(`${BASE}/${fail ? 'error' : 'api'}/pay`, { tags: { name: 'pay' } });
    paid.add(r.status === 200);
    if (r.status === 200) { orders.add(1); cartValue.add(10 + Math.random() * 190); }
    queueDepth.add(Math.floor(Math.random() * 50));
  });
}
export function handleSummary(data) {
  return __ENV.SUMMARY_JSON ? { [__ENV.SUMMARY_JSON]: JSON.stringify(data) } : {};
}
