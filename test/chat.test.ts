// The model-free parts of chats (lib/llm/chat.ts): rendering a conversation to tokens with the
// generated vocabularies of test/llm-fixtures.ts, the prefix a turn reuses (append-only templates
// and templates that rewrite earlier turns), and the context overflow policy checked against a
// linear drop-one-turn-at-a-time reference.
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../lib/errors.js';
import {
  commonPrefixLength, fitConversation, renderChat, replyReserve, reusableTokens, toMessage, turnBoundaries,
} from '../lib/llm/chat.js';
import { Tokenizer, type ChatMessage } from '../lib/llm/tokenizer.js';
import { bpeVocab, spmVocab } from './llm-fixtures.js';

const CHATML = '{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}'
  + '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';
// Like templates of reasoning models: an assistant turn that is not the last message loses its
// <think> section when the conversation is rendered again.
const STRIP_THINK = '{% for m in messages %}<|im_start|>{{ m.role }}\n'
  + "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}"
  + '<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}';

function qwenTokenizer(template = CHATML): Tokenizer {
  const v = bpeVocab();
  const eos = v.tokens.indexOf('<|endoftext|>');
  return Tokenizer.fromGguf({
    'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': 'qwen2', 'tokenizer.ggml.tokens': v.tokens,
    'tokenizer.ggml.token_type': v.types, 'tokenizer.ggml.merges': v.merges, 'tokenizer.ggml.eos_token_id': eos,
    'tokenizer.ggml.bos_token_id': eos, 'tokenizer.ggml.add_bos_token': false, 'tokenizer.chat_template': template,
  });
}

function llamaTokenizer(template: string): Tokenizer {
  const v = spmVocab();
  return Tokenizer.fromGguf({
    'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.tokens': v.tokens, 'tokenizer.ggml.scores': v.scores,
    'tokenizer.ggml.token_type': v.types, 'tokenizer.ggml.bos_token_id': 1, 'tokenizer.ggml.eos_token_id': 2,
    'tokenizer.ggml.unknown_token_id': 0, 'tokenizer.ggml.add_bos_token': true, 'tokenizer.ggml.add_eos_token': false,
    'tokenizer.chat_template': template,
  });
}

const encodeSpecial = (tok: Tokenizer, text: string) => tok.encode(text, { addSpecial: false, parseSpecial: true });

describe('renderChat', () => {
  it('renders with the template and parses control tokens (ChatML on the gpt2 vocabulary)', () => {
    const tok = qwenTokenizer();
    const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'hello world' }];
    const text = '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n';
    const tokens = renderChat(tok, messages);
    expect(tokens).toEqual(encodeSpecial(tok, text));
    const imStart = tok.encode('<|im_start|>', { addSpecial: false, parseSpecial: true });
    expect(imStart).toHaveLength(1);
    expect(tokens.filter((t) => t === imStart[0])).toHaveLength(3);
    expect(tokens[tokens.length - 1]).toBe(encodeSpecial(tok, '\n')[0]);
  });

  it('adds BOS when the vocabulary asks and the template does not write it, and never twice', () => {
    const plain = llamaTokenizer('{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}');
    const a = renderChat(plain, [{ role: 'user', content: 'hello' }]);
    expect(a[0]).toBe(1);
    expect(a.slice(1)).toEqual(encodeSpecial(plain, '[user] hello\n'));
    const withBos = llamaTokenizer('{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}');
    const b = renderChat(withBos, [{ role: 'user', content: 'hello' }]);
    expect(b).toEqual(a);
    expect(b.filter((t) => t === 1)).toHaveLength(1);
  });
});

describe('the prefix a turn reuses', () => {
  it('commonPrefixLength and reusableTokens at the edges', () => {
    expect(commonPrefixLength([], [])).toBe(0);
    expect(commonPrefixLength([1], [])).toBe(0);
    expect(commonPrefixLength([1, 2, 3], [1, 2, 3])).toBe(3);
    expect(commonPrefixLength([1, 2, 3], [1, 2, 4, 5])).toBe(2);
    expect(commonPrefixLength(Int32Array.of(1, 2), [1, 2, 3])).toBe(2);
    expect(commonPrefixLength([9, 2], [1, 2])).toBe(0);
    // The whole prompt cached: its last token is evaluated again for the logits of the reply.
    expect(reusableTokens([1, 2, 3], [1, 2, 3])).toBe(2);
    expect(reusableTokens([1, 2, 3, 4, 5], [1, 2, 3])).toBe(2);
    expect(reusableTokens([1, 2], [1, 2, 3, 4])).toBe(2);
    expect(reusableTokens([], [7])).toBe(0);
    expect(reusableTokens([7], [7])).toBe(0);
  });

  it('an append-only template: the second turn reuses every token of the first turn\'s conversation', () => {
    const tok = qwenTokenizer();
    const first: ChatMessage[] = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'hello' }];
    const prompt1 = renderChat(tok, first);
    // What the cache holds after the first reply: the prompt, then the reply's tokens and the end
    // of turn (the reply here re-tokenises to the same tokens, as it was produced by encoding).
    const reply = 'the hello and the world';
    const cached = [...prompt1, ...encodeSpecial(tok, reply), ...encodeSpecial(tok, '<|im_end|>')];
    const second = [...first, { role: 'assistant', content: reply }, { role: 'user', content: 'and then?' }];
    const prompt2 = renderChat(tok, second);
    expect(prompt2.slice(0, cached.length)).toEqual(cached);
    expect(reusableTokens(cached, prompt2)).toBe(cached.length);
    expect(prompt2.slice(cached.length)).toEqual(encodeSpecial(tok, '\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n'));
  });

  it('a template that rewrites an earlier turn: reuse stops at the first difference', () => {
    const tok = qwenTokenizer(STRIP_THINK);
    const first: ChatMessage[] = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'hello' }];
    const prompt1 = renderChat(tok, first);
    const reply = '<think>is it the world?</think>hello world';
    const cached = [...prompt1, ...encodeSpecial(tok, reply), ...encodeSpecial(tok, '<|im_end|>')];
    const prompt2 = renderChat(tok, [...first, { role: 'assistant', content: reply }, { role: 'user', content: 'and?' }]);
    // The rendered reply starts at once with its answer, so everything after the first prompt differs.
    const at = reusableTokens(cached, prompt2);
    const reference = prompt1.length + commonPrefixLength(encodeSpecial(tok, reply), encodeSpecial(tok, 'hello world'));
    expect(at).toBe(reference);
    expect(at).toBe(prompt1.length);
    expect(prompt2.slice(at)).toEqual(encodeSpecial(tok, 'hello world<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n'));
  });
});

describe('context overflow', () => {
  const tok = qwenTokenizer();
  const render = (m: readonly ChatMessage[]) => renderChat(tok, m);
  const system: ChatMessage = { role: 'system', content: 'Be brief.' };
  // Turns of different lengths, one with a tool message, so that dropping one turn is not
  // dropping a fixed number of tokens.
  const history: ChatMessage[] = [
    system,
    { role: 'user', content: 'hello' }, { role: 'assistant', content: 'hello and the world' },
    { role: 'user', content: 'the sea is in the west' }, { role: 'tool', content: 'ok' }, { role: 'assistant', content: 'the end' },
    { role: 'user', content: 'then' }, { role: 'assistant', content: 'and the rest of it is here' },
  ];
  const next: ChatMessage = { role: 'user', content: 'what is the world?' };

  /** The reference: drop whole turns one at a time, oldest first, until it fits. */
  function linear(limit: number): { messages: ChatMessage[]; dropped: number } | undefined {
    const starts = [1, 3, 6, 8];
    for (let k = 0; k < starts.length; k++) {
      const messages = [system, ...history.slice(starts[k]), next];
      if (render(messages).length <= limit) return { messages, dropped: starts[k]! - 1 };
    }
    return undefined;
  }

  it('turn boundaries: leading system messages are pinned, each user message opens a turn', () => {
    expect(turnBoundaries(history)).toEqual({ pinned: 1, starts: [1, 3, 6, 8] });
    expect(turnBoundaries([])).toEqual({ pinned: 0, starts: [0] });
    expect(turnBoundaries([system])).toEqual({ pinned: 1, starts: [1] });
    expect(turnBoundaries([{ role: 'assistant', content: 'hi' }, { role: 'user', content: 'x' }])).toEqual({ pinned: 0, starts: [0, 1, 2] });
  });

  it('fits as is when it fits, at the exact limit too', () => {
    const full = render([...history, next]).length;
    for (const policy of ['error', 'drop-oldest'] as const) {
      const r = fitConversation('Chat.send', render, history, next, full + 10, 10, policy);
      expect(r.dropped).toBe(0);
      expect(r.tokens).toHaveLength(full);
      expect(r.messages).toEqual([...history, next]);
    }
  });

  it("'error' names the sizes and leaves the history alone", () => {
    const full = render([...history, next]).length;
    const copy = structuredClone(history);
    expect(() => fitConversation('Chat.send', render, history, next, full + 9, 10, 'error'))
      .toThrow(new RegExp(`renders to ${full} tokens, which with the reply reserve of 10 is more than the context of ${full + 9} tokens`));
    expect(() => fitConversation('Chat.send', render, history, next, full, 1, 'error')).toThrow(InvalidArgumentError);
    expect(history).toEqual(copy);
  });

  it("'drop-oldest' drops the fewest whole turns that make it fit, as the linear reference does", () => {
    const full = render([...history, next]).length;
    const least = render([system, next]).length;
    const seenDrops = new Set<number>();
    for (let limit = least; limit <= full; limit++) {
      const want = linear(limit)!;
      const got = fitConversation('Chat.send', render, history, next, limit + 5, 5, 'drop-oldest');
      expect(got.messages, `limit ${limit}`).toEqual(want.messages);
      expect(got.dropped).toBe(want.dropped);
      expect(got.tokens).toEqual(render(want.messages));
      expect(got.tokens.length).toBeLessThanOrEqual(limit);
      expect(got.messages[0]).toEqual(system);
      expect(got.messages[got.messages.length - 1]).toEqual(next);
      seenDrops.add(got.dropped);
    }
    // Every number of dropped turns occurred across the limits.
    expect([...seenDrops].sort((a, b) => a - b)).toEqual([0, 2, 5, 7]);
  });

  it("'drop-oldest' throws when the new message and the system prompt alone do not fit", () => {
    const least = render([system, next]).length;
    expect(() => fitConversation('Chat.send', render, history, next, least + 3, 4, 'drop-oldest'))
      .toThrow(new RegExp(`system prompt alone renders to ${least} tokens, which with the reply reserve of 4 is more than the context of ${least + 3}`));
    expect(() => fitConversation('Chat.send', render, [system], next, least - 1, 0, 'drop-oldest')).toThrow(InvalidArgumentError);
  });
});

describe('argument checks', () => {
  it('toMessage takes a string or a message and names what else it got', () => {
    expect(toMessage('Chat.send', 'hi')).toEqual({ role: 'user', content: 'hi' });
    expect(toMessage('Chat.send', { role: 'tool', content: 'x' })).toEqual({ role: 'tool', content: 'x' });
    expect(() => toMessage('Chat.send', 42)).toThrow(/Chat.send\(message\) must be a string or a chat message \{ role, content \}, got 42/);
    expect(() => toMessage('Chat.send', { content: 'x' })).toThrow(InvalidArgumentError);
    expect(() => toMessage('Chat.send', null)).toThrow(InvalidArgumentError);
  });

  it('replyReserve: the option, else maxTokens, else a quarter of the context up to 256', () => {
    expect(replyReserve('w', 100, 7, 50)).toBe(7);
    expect(replyReserve('w', 100, undefined, 50)).toBe(50);
    expect(replyReserve('w', 100, undefined, 500)).toBe(99);
    expect(replyReserve('w', 100, undefined, undefined)).toBe(25);
    expect(replyReserve('w', 4096, undefined, undefined)).toBe(256);
    expect(replyReserve('w', 1, undefined, undefined)).toBe(0);
    expect(() => replyReserve('w', 100, 100, undefined)).toThrow(/options.replyReserve must be an integer in \[0, 99\]/);
    expect(() => replyReserve('w', 100, -1, undefined)).toThrow(InvalidArgumentError);
  });
});
