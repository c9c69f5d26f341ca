// Accuracy of the digits model (models/digits.onnx) on its held-out split after magnitude pruning
// without retraining, for the README's table: `node scripts/prune-digits.js` (after `npm run build`).
// Each row prunes every layer but the first (keepFirstLayerDense, the default) to the given
// sparsity, unstructured and in 1x16 blocks, and counts correct top-1 predictions.
import { Session, Tensor, prune } from '../dist/index.js';
import { countCorrect, modelPath, readReport, readTestSplit } from '../models/digits.js';

const SPARSITIES = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9];
const split = readTestSplit();
const images = new Tensor('float32', split.images, [split.n, 1, split.height, split.width]);

async function accuracy(bytes) {
  const session = await Session.load(bytes);
  try {
    const out = await session.run({ [session.inputs[0].name]: images });
    return countCorrect(out[session.outputs[0].name].data, split.labels) / split.n;
  } finally {
    session.dispose();
  }
}

const pct = (x) => `${(100 * x).toFixed(1)}%`;
const rows = [];
for (const sparsity of SPARSITIES) {
  const un = await prune(modelPath, { sparsity });
  const block = await prune(modelPath, { sparsity, structure: 'block', blockSize: 16 });
  rows.push([pct(sparsity), pct(un.report.overallSparsity), pct(await accuracy(un.bytes)), pct(await accuracy(block.bytes))]);
}
const report = readReport();
console.log(`digits model: ${report.parameters} parameters, ${split.n} test images, trained accuracy ${pct(report.test_accuracy)}`);
console.log('| sparsity per pruned layer | zeros over all prunable weights | accuracy, unstructured | accuracy, 1x16 blocks |');
console.log('|---:|---:|---:|---:|');
for (const r of rows) console.log(`| ${r.join(' | ')} |`);
