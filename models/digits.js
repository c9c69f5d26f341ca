// Readers for the embedded default model's files (written by scripts/train-digits.py), shared by
// scripts/demo.js and test/digits.test.ts so both check the same bytes the same way.
//
// digits-test.bin layout (little-endian):
//   offset 0   4 bytes   magic "SDG1"
//   offset 4   uint32    n, the number of images
//   offset 8   uint32    height (8)
//   offset 12  uint32    width (8)
//   offset 16  float32   n * height * width pixels, image after image, row-major, already scaled as
//                        in training (raw 0..16 / 16): feed them to the model unchanged
//   then       uint8     n labels (0..9)
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const modelPath = fileURLToPath(new URL('./digits.onnx', import.meta.url));
export const testSplitPath = fileURLToPath(new URL('./digits-test.bin', import.meta.url));
export const reportPath = fileURLToPath(new URL('./digits.json', import.meta.url));

const MAGIC = 'SDG1';
const HEADER_BYTES = 16;

/** What the training script measured with torch: { test_correct, test_size, test_accuracy, ... }. */
export function readReport(path = reportPath) {
  return JSON.parse(readFileSync(path, 'utf8'));
}

/** The held-out split: { n, height, width, images: Float32Array [n*h*w], labels: Uint8Array [n] }. */
export function readTestSplit(path = testSplitPath) {
  const bytes = readFileSync(path);
  if (bytes.length < HEADER_BYTES || bytes.toString('latin1', 0, 4) !== MAGIC) {
    throw new Error(`${path} is not a digits test split (no "${MAGIC}" header)`);
  }
  const n = bytes.readUInt32LE(4);
  const height = bytes.readUInt32LE(8);
  const width = bytes.readUInt32LE(12);
  const pixels = n * height * width;
  const expected = HEADER_BYTES + pixels * 4 + n;
  if (bytes.length !== expected) {
    throw new Error(`${path} has ${bytes.length} bytes; its header (${n} images of ${height}x${width}) implies ${expected}`);
  }
  // Copied out: a Buffer from readFileSync may sit at an unaligned offset of a pooled ArrayBuffer.
  const images = new Float32Array(pixels);
  for (let i = 0; i < pixels; i++) images[i] = bytes.readFloatLE(HEADER_BYTES + 4 * i);
  const labels = Uint8Array.from(bytes.subarray(HEADER_BYTES + pixels * 4));
  return { n, height, width, images, labels };
}

/** Index of the largest of `classes` logits of row `row` (the first one on a tie). */
export function argmaxRow(logits, row, classes) {
  let best = 0;
  for (let j = 1; j < classes; j++) if (logits[row * classes + j] > logits[row * classes + best]) best = j;
  return best;
}

/** How many rows of `logits` ([n, classes]) pick their label. */
export function countCorrect(logits, labels, classes = 10) {
  let correct = 0;
  for (let i = 0; i < labels.length; i++) if (argmaxRow(logits, i, classes) === labels[i]) correct++;
  return correct;
}
