// npm run bench -- <suite...> [--json] [--quick] [--full] [--ort-spin]
// Prints the machine first, then one line per case (a table, or with --json one JSON object per
// case). Ratios against an anchor are measured in the same process, pair by pair.
// --full runs the suites that have one (llm, serving) longer: more rounds, longer generations.
// --emulated runs the cuda suite on the CUDA emulator when there is no GPU (checks the suite, not speed).
// --ort-spin leaves onnxruntime-node's pool threads spinning between runs (its default); the suites
// turn spinning off because a spinning thread holds a core while sonde's next run is timed.
import { devices, getThreads } from '../dist/index.js';
import { suites } from './suites.js';

const args = process.argv.slice(2);
const json = args.includes('--json');
const quick = args.includes('--quick');
const full = args.includes('--full');
const ortSpin = args.includes('--ort-spin');
const emulated = args.includes('--emulated');
const names = args.filter((a) => !a.startsWith('--'));
const unknown = names.filter((n) => !(n in suites));
if (names.length === 0 || unknown.length) {
  console.error(`usage: npm run bench -- <${Object.keys(suites).join('|')}|all> [--json] [--quick] [--full] [--ort-spin] [--emulated]`);
  if (unknown.length && !(unknown.length === 1 && unknown[0] === 'all')) process.exit(2);
}
const selected = names.includes('all') || names.length === 0 ? Object.keys(suites) : names;

const d = devices();
const machine = { cpu: d.cpu.model, cores: d.cpu.cores, simd: d.cpu.simd, threads: getThreads(),
  features: d.cpu.features.join(' '), node: process.version,
  cuda: d.cuda.devices.map((g) => g.name).join(', ') || `none (${d.cuda.reason})` };
if (json) console.log(JSON.stringify({ machine }));
else console.log(`machine: ${machine.cpu}, ${machine.cores} cores, SIMD ${machine.simd}, ${machine.threads} threads, Node ${machine.node}; CUDA: ${machine.cuda}`);

const ctx = { quick, full, ortSpin, emulated, cache: new Map() };
for (const name of selected) {
  if (!json) console.log(`\n## ${name}`);
  let header = '';
  for await (const row of suites[name](ctx)) {
    const rec = { suite: name, ...row };
    if (json) {
      console.log(JSON.stringify(rec));
      continue;
    }
    // Cases of one suite can report different columns (e.g. GB/s only where memory-bound): a new
    // header line whenever the columns change keeps the table aligned.
    const cols = Object.keys(row);
    if (cols.join() !== header) {
      console.log(cols.map((c) => c.padEnd(c === 'case' ? 34 : 12)).join(' '));
      header = cols.join();
    }
    console.log(cols.map((c) => {
      const v = row[c];
      const s = typeof v === 'number' ? (Number.isInteger(v) ? String(v) : Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(3)) : String(v ?? '');
      return s.padEnd(c === 'case' ? 34 : 12);
    }).join(' '));
  }
}
