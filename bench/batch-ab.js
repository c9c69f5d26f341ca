// node bench/batch-ab.js <model> <rounds> <sliceMs> <variant JSON>...: closed-loop throughput of 64
// batch-1 callers on sessions with the given batching options (2 threads), in alternating slices
// (the order reversed every round), so that the machine's drift hits every variant alike; prints
// requests/s per variant and the ratio to the first. A variant is a JSON object of session options,
// e.g. '{}' (batching off) and '{"batching":{"maxBatchSize":8,"maxDelayMs":5}}'.
import { Session, Tensor } from '../dist/index.js';
import { modelBytes, modelInput } from './graphs/models.js';

const [name = 'mobilenetv2', roundsArg = '4', sliceArg = '3000', ...specs] = process.argv.slice(2);
const variants = (specs.length ? specs : ['{}', '{"batching":{"maxBatchSize":8,"maxDelayMs":5}}']).map((s) => ({ spec: s, options: JSON.parse(s), n: 0, ms: 0 }));
const callers = 64, bytes = modelBytes(name);
const inputs = Array.from({ length: callers }, (_, i) => modelInput(name, 1, 1000 + i));
for (const v of variants) v.session = await Session.load(bytes, { device: 'cpu', threads: 2, ...v.options });
for (const v of variants) await Promise.all(inputs.slice(0, 16).map((x) => v.session.run({ input: new Tensor('float32', x.data, x.dims) })));
for (let r = 0; r < Number(roundsArg); r++) {
  for (const v of r % 2 ? [...variants].reverse() : variants) {
    const start = performance.now(), end = start + Number(sliceArg);
    await Promise.all(inputs.map(async (x) => {
      const feed = { input: new Tensor('float32', x.data, x.dims) };
      while (performance.now() < end) {
        await v.session.run(feed);
        v.n++;
      }
    }));
    v.ms += performance.now() - start;
  }
}
const base = variants[0].n / variants[0].ms;
for (const v of variants) {
  const rps = v.n / v.ms * 1000;
  const b = v.session.metrics().batchSize;
  console.log(`${name} ${v.spec}: ${rps.toFixed(1)} req/s (${(v.n / v.ms / base).toFixed(3)}x the first), batch mean ${b.mean?.toFixed(2) ?? '-'} p50 ${b.p50 ?? '-'}`);
  v.session.dispose();
}
