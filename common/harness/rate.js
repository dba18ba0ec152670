// The benchmark's constant arrival rate: one http.get per iteration, RATE per second for
// DUR. handleSummary writes k6's summary to SUMMARY_JSON, so that nothing but the JSON
// stream reaches k6's standard output.
import http from 'k6/http';
export const options = {
  scenarios: {
    load: { executor: 'constant-arrival-rate', rate: Number(__ENV.RATE), timeUnit: '1s',
            duration: __ENV.DUR, preAllocatedVUs: 100, maxVUs: 200 },
  },
};
export default function () { http.get(`${__ENV.BASE}/fast`, { tags: { name: 'fast' } }); }
export function handleSummary(data) { return { [__ENV.SUMMARY_JSON]: JSON.stringify(data) }; }
