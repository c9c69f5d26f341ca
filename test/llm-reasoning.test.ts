/**
 * R1-style reasoning output: generate() marks the tokens of a <think>…</think> section
 * (reasoning: true) or hides them, on a generated deepseek2 model whose vocabulary has the
 * markers as control tokens; and the splitter's transitions on hand-written event streams.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../lib/errors.js';
import { LanguageModel, ReasoningSplitter, type GeneratedToken } from '../lib/llm/language-model.js';
import { fixtureDir, writeFixture } from './llm-fixtures.js';

const dir = fixtureDir('sonde-reasoning-');
let model: LanguageModel;
let open: number, close: number;

// R1's template opens the reasoning section for the reply: the generation prompt ends in <think>.
const R1_TEMPLATE = '{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}'
  + '{% if add_generation_prompt %}<|im_start|>assistant\n<think>{% endif %}';

beforeAll(async () => {
  const info = await writeFixture(join(dir, 'r1.gguf'), { kind: 'deepseek2', type: 'f32', seed: 4, extraSpecialTokens: ['<think>', '</think>'],
    metadata: { 'tokenizer.chat_template': R1_TEMPLATE } });
  open = info.vocabSize - 2;
  close = info.vocabSize - 1;
  model = await LanguageModel.load(info.path, { threads: 1, contextSize: 128 });
}, 60_000);

afterAll(() => model?.dispose());

async function run(prompt: number[], options: { reasoning?: 'show' | 'hide'; maxTokens: number; stop?: number[] }): Promise<GeneratedToken[]> {
  const out: GeneratedToken[] = [];
  for await (const e of model.generate(prompt, { temperature: 0, ...options })) out.push(e);
  return out;
}

describe('reasoning split in generate()', () => {
  it('a prompt that opens <think> makes the reply reasoning until </think>; hide leaves it out', async () => {
    const shown = await run([20, 30, open], { maxTokens: 12 });
    expect(shown.length).toBe(12);
    // Greedy on a random model: if it closes the section, what follows is the answer.
    const closeAt = shown.findIndex((e) => e.token === close);
    shown.forEach((e, i) => expect(e.reasoning === true, `event ${i}`).toBe(closeAt < 0 || i <= closeAt));
    const hidden = await run([20, 30, open], { maxTokens: 12, reasoning: 'hide' });
    expect(hidden).toEqual(shown.filter((e) => !e.reasoning));
  });

  it('a closed section in the prompt leaves the reply as answer', async () => {
    const shown = await run([open, 20, close, 30], { maxTokens: 8 });
    const firstOpen = shown.findIndex((e) => e.token === open);
    shown.forEach((e, i) => { if (firstOpen < 0 || i < firstOpen) expect(e.reasoning).toBeUndefined(); });
    const hidden = await run([open, 20, close, 30], { maxTokens: 8, reasoning: 'hide' });
    expect(hidden).toEqual(shown.filter((e) => !e.reasoning));
  });

  it('options.reasoning is checked', () => {
    expect(() => model.generate([1], { reasoning: 'fold' as never })).toThrow(InvalidArgumentError);
    expect(() => model.generate([1], { reasoning: 'fold' as never })).toThrow(/options\.reasoning/);
  });
});

describe('reasoning in Chat.send', () => {
  const collect = async (it: AsyncIterable<GeneratedToken>) => {
    const out: GeneratedToken[] = [];
    for await (const e of it) out.push(e);
    return out;
  };

  it('passes options.reasoning through: the reply starts inside <think>, hide leaves the section out', async () => {
    // Two fresh chats render the same prompt, so greedy replies differ only in what is emitted.
    const shownChat = model.chat({ temperature: 0, maxTokens: 12 });
    const hiddenChat = model.chat({ temperature: 0, maxTokens: 12 });
    try {
      const shown = await collect(shownChat.send('hello world'));
      expect(shown.length).toBe(12);
      const closeAt = shown.findIndex((e) => e.token === close);
      shown.forEach((e, i) => expect(e.reasoning === true, `event ${i}`).toBe(closeAt < 0 || i <= closeAt));
      const hidden = await collect(hiddenChat.send('hello world', { reasoning: 'hide' }));
      expect(hidden).toEqual(shown.filter((e) => !e.reasoning));
      // The conversation keeps what the reader got: the hidden chat's reply is the answer alone.
      expect(hiddenChat.messages.at(-1)).toEqual({ role: 'assistant', content: hidden.map((e) => e.text).join('') });
    } finally {
      shownChat.dispose();
      hiddenChat.dispose();
    }
  });

  it('options.reasoning of send is checked', () => {
    const chat = model.chat();
    try {
      expect(() => chat.send('hi', { reasoning: 'fold' as never })).toThrow(InvalidArgumentError);
      expect(() => chat.send('hi', { reasoning: 'fold' as never })).toThrow(/Chat\.send: options\.reasoning/);
    } finally {
      chat.dispose();
    }
  });
});

describe('ReasoningSplitter', () => {
  const tok = (ids: Record<string, number>) => ({ encode: (t: string) => (t in ids ? [ids[t]!] : [7, 8, 9]) });
  const events = (ids: number[]) => ids.map((token) => ({ token, text: `t${token}` }) as GeneratedToken);

  it('opens and closes on the marker tokens, markers included', () => {
    const s = new ReasoningSplitter(tok({ '<think>': 100, '</think>': 101 }), [1, 2]);
    const marks = events([5, 100, 6, 7, 101, 8, 100, 9]).map((e) => s.mark(e));
    expect(marks).toEqual([false, true, true, true, true, false, true, true]);
  });

  it('starts inside when the prompt ends in an open section', () => {
    expect(new ReasoningSplitter(tok({ '<think>': 100, '</think>': 101 }), [1, 100, 3]).mark(events([4])[0]!)).toBe(true);
    expect(new ReasoningSplitter(tok({ '<think>': 100, '</think>': 101 }), [100, 3, 101]).mark(events([4])[0]!)).toBe(false);
  });

  it('a vocabulary without both markers has no reasoning', () => {
    const s = new ReasoningSplitter(tok({ '<think>': 100 }), [100]);
    expect(s.open).toBeUndefined();
    const e = events([100, 5]);
    expect(e.map((x) => s.mark(x))).toEqual([false, false]);
    expect(e[0]!.reasoning).toBeUndefined();
  });
});
