/**
 * The generated models of bench/llm/models.js (shared by the test fixtures and the `llm` and
 * `serving` bench suites): the benchmark shapes are the issues' sizes, values do not depend on
 * which tensors a fixture omits, and `wordsOnly` keeps greedy decoding on word pieces.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LanguageModel, gguf, kernels } from '../dist/index.js';
import { LLM_MODELS, llmModelSpec } from '../bench/llm/models.js';
import { fixtureDir, spmVocab, writeFixture } from './llm-fixtures.js';

const dir = fixtureDir('sonde-bench-models-');
const opened: { dispose(): void }[] = [];
afterAll(() => { for (const f of opened) f.dispose(); });

/** Elements per tensor name, counted from the dims alone (nothing is generated). */
function elements(o: Parameters<typeof llmModelSpec>[0]): Map<string, number> {
  const { spec } = llmModelSpec(o, gguf.typed);
  return new Map(spec.tensors.map((t) => [t.name, t.dims.reduce((a, b) => a * b, 1)]));
}

describe('bench/llm/models.js', () => {
  it('the benchmark models have the sizes of issues #8 and #9', () => {
    const moe = elements({ ...LLM_MODELS.moe, type: 'q8_0' });
    const total = [...moe.values()].reduce((a, b) => a + b, 0);
    // Hand count: per layer q, o 1024x1024, k, v 1024x256, 8 experts x 3 x 1024x1408, router
    // 1024x8, two norms; embedding and output 311x1024, the final norm.
    const layer = 2 * 1024 * 1024 + 2 * 1024 * 256 + 8 * 3 * 1024 * 1408 + 1024 * 8 + 2 * 1024;
    expect(total).toBe(12 * layer + 2 * 311 * 1024 + 1024);
    expect(total / 1e9).toBeCloseTo(0.45, 2);
    expect(moe.get('blk.11.ffn_up_exps.weight')).toBe(1024 * 1408 * 8);
    const dense = [...elements({ ...LLM_MODELS.dense, type: 'q8_0' }).values()].reduce((a, b) => a + b, 0);
    expect(dense).toBeGreaterThan(40e6);
    expect(dense).toBeLessThan(60e6);
  });

  it('values come from one stream in tensor order: omitting a tensor does not change the others', async () => {
    const whole = await writeFixture(join(dir, 'whole.gguf'), { kind: 'llama', type: 'f32' });
    const part = await writeFixture(join(dir, 'part.gguf'), { kind: 'llama', type: 'f32', omit: ['blk.0.attn_k.weight'] });
    const [a, b] = await Promise.all([gguf.read(whole.path), gguf.read(part.path)]);
    opened.push(a, b);
    expect(b.tensor('blk.0.attn_k.weight')).toBeUndefined();
    for (const name of ['blk.0.attn_q.weight', 'blk.0.attn_v.weight', 'blk.1.ffn_down.weight', 'output.weight']) {
      const [x, y] = await Promise.all([kernels.dequantize(a.tensor(name)!), kernels.dequantize(b.tensor(name)!)]);
      expect(y.data, name).toEqual(x.data);
    }
  });

  it('wordsOnly zeroes the output rows of control and byte tokens, so greedy decoding emits word pieces only', async () => {
    const info = await writeFixture(join(dir, 'words.gguf'), { kind: 'llama', type: 'q8_0', wordsOnly: true, layers: 2 });
    const types = spmVocab().types;
    const file = await gguf.read(info.path);
    opened.push(file);
    const out = (await kernels.dequantize(file.tensor('output.weight')!)).data;
    const d = info.embedding;
    types.forEach((t, id) => {
      const row = out.subarray(id * d, (id + 1) * d);
      const zero = row.every((v) => v === 0);
      expect(zero, `output row ${id} (type ${t})`).toBe(t !== 1);
    });
    const model = await LanguageModel.load(info.path, { threads: 1 });
    opened.push(model);
    const prompts = [[1, 3, 4, 5], [1, 300, 301], [1, 200, 17, 90, 2]];
    for (const p of prompts) {
      const tokens: number[] = [];
      for await (const e of model.generate(p, { maxTokens: 32, temperature: 0 })) tokens.push(e.token);
      expect(tokens.length).toBe(32);
      for (const t of tokens) expect(types[t], `token ${t}`).toBe(1);
    }
  });
});
