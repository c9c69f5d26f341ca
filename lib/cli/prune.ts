/**
 * `sonde prune in.onnx out.onnx --sparsity 0.9`: prune() with a progress bar and the report as a
 * table. The output is written to a temporary file beside it and renamed into place, so a failure
 * or an interrupt never leaves a half-written out.onnx (rename is atomic on one filesystem).
 */
import { rename, unlink, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { InvalidArgumentError } from '../errors.js';
import { prune, type PruneOptions, type PruneReport } from '../prune.js';

export class UsageError extends Error {}

export const PRUNE_USAGE = `usage: sonde prune <in.onnx> <out.onnx> (--sparsity S | --threshold T) [options]

  --sparsity S          fraction of each layer's weights to zero, in [0, 1)
  --threshold T         zero every weight with |w| < T instead
  --structure KIND      unstructured (default) or block
  --block-size W        block width for --structure block: 8, 16 (default) or 32
  --include NAMES       only prune these layers (node or weight names, comma-separated; repeatable)
  --exclude NAMES       never prune these layers
  --prune-first-layer   also prune the first layer (kept dense by default)
  --storage KIND        dense (default: explicit zeros) or sparse (sparse_initializer)
  --json                print the report as JSON instead of a table
  -q, --quiet           no progress bar, no table

Pruning without retraining costs accuracy: check the pruned model on your data.
`;

function number(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got '${v}'`);
  return n;
}

const list = (v: string[] | undefined) => v?.flatMap((s) => s.split(',')).map((s) => s.trim()).filter(Boolean);

export async function runPrune(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        sparsity: { type: 'string' }, threshold: { type: 'string' }, structure: { type: 'string' },
        'block-size': { type: 'string' }, include: { type: 'string', multiple: true }, exclude: { type: 'string', multiple: true },
        'prune-first-layer': { type: 'boolean' }, storage: { type: 'string' }, json: { type: 'boolean' },
        quiet: { type: 'boolean', short: 'q' }, help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values: v, positionals } = parsed;
  if (v.help) {
    process.stdout.write(PRUNE_USAGE);
    return 0;
  }
  if (positionals.length !== 2) throw new UsageError(`prune takes an input and an output file, got ${positionals.length} file argument(s)`);
  const [input, output] = positionals as [string, string];
  const options: PruneOptions = {};
  const put = <K extends keyof PruneOptions>(k: K, val: PruneOptions[K] | undefined) => { if (val !== undefined) options[k] = val; };
  put('sparsity', number('sparsity', v.sparsity));
  put('threshold', number('threshold', v.threshold));
  put('structure', v.structure as PruneOptions['structure']);
  put('blockSize', number('block-size', v['block-size']));
  put('include', list(v.include));
  put('exclude', list(v.exclude));
  if (v['prune-first-layer']) options.keepFirstLayerDense = false;
  put('storage', v.storage as PruneOptions['storage']);

  const bar = !v.quiet && process.stderr.isTTY ? progressBar() : undefined;
  if (bar) options.onProgress = bar.update;
  let result;
  try {
    result = await prune(input, options);
  } finally {
    bar?.clear();
  }
  await writeAtomically(output, result.bytes);
  if (v.json) process.stdout.write(`${JSON.stringify(result.report, null, 2)}\n`);
  else if (!v.quiet) process.stdout.write(formatReport(result.report, output));
  return 0;
}

async function writeAtomically(path: string, bytes: Uint8Array): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const cleanup = () => { void unlink(tmp).catch(() => {}); };
  const onSignal = (sig: NodeJS.Signals) => {
    cleanup();
    process.kill(process.pid, sig);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    await writeFile(tmp, bytes);
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw new InvalidArgumentError(`cannot write '${path}': ${(err as Error).message}`, { cause: err });
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

function progressBar() {
  const width = 30;
  return {
    update({ done, total, layer }: { done: number; total: number; layer: string }) {
      const filled = Math.round((done / total) * width);
      const name = layer.length > 40 ? `${layer.slice(0, 37)}...` : layer;
      process.stderr.write(`\r\x1b[K[${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${done}/${total} ${name}`);
    },
    clear() {
      process.stderr.write('\r\x1b[K');
    },
  };
}

export function formatReport(report: PruneReport, output: string): string {
  const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
  const rows = report.layers.map((l) => [
    l.layer, l.opType, l.shape.join('x'), String(l.size), pct(l.sparsity), l.pruned ? pct(l.normRemoved) : '-', l.pruned ? '' : `kept: ${l.skipped}`,
  ]);
  const head = ['layer', 'op', 'shape', 'weights', 'sparsity', 'norm removed', ''];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const right = [false, false, false, true, true, true, false];
  const line = (r: string[]) => r.map((c, i) => (right[i] ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd();
  return [
    line(head),
    line(widths.map((w) => '-'.repeat(w))),
    ...rows.map(line),
    '',
    `${report.prunedLayers} of ${report.layers.length} layers pruned: ${pct(report.sparsity)} of their weights are zero (${pct(report.overallSparsity)} over all prunable layers).`,
    `Wrote ${output}. Pruning without retraining costs accuracy: check the model on your data.`,
    '',
  ].join('\n');
}
