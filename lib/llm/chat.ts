/**
 * Chats (issue #9, item 3): a conversation that keeps its KV blocks between turns.
 *
 * Each turn renders the whole conversation with the chat template and evaluates only the tokens
 * after the longest prefix the chat's cache already holds. Rendering everything (rather than
 * appending the new message's text) is what makes the tokens exactly those generate() would see
 * for the same messages; templates that rewrite earlier turns (dropping reasoning, re-numbering)
 * or a reply whose text re-tokenises differently just move the first difference earlier, and the
 * cache is recomputed from there.
 *
 * The decisions that need no model (rendering, prefix diffing, the context overflow policy) are
 * plain functions; Chat runs them over a ChatHost, which LanguageModel implements on its
 * scheduler's retained sequences (lib/llm/kv/scheduler.ts): the conversation's blocks stay
 * referenced between turns, so nothing it relies on is evicted, and blocks it shares with other
 * chats (the same system prompt) are shared through the prefix cache and copied on write.
 */
import { DisposedError, InvalidArgumentError, ModelFormatError } from '../errors.js';
import { checkInt, checkOneOf, checkOptions, checkSignal, describe } from '../validate.js';
import { readKvState, writeKvState, type KvStateLayout, type KvStateModel } from './kv/state.js';
import type { GeneratedToken } from './language-model.js';
import { SAMPLING_OPTIONS, Sampler, type SamplingOptions } from './sampling.js';
import type { ChatMessage } from './tokenizer.js';

/**
 * What a chat does when the conversation plus the reply reserve no longer fits the context:
 * - 'error': send() throws an InvalidArgumentError naming the sizes; the conversation is unchanged.
 * - 'drop-oldest': the oldest turns after the leading system messages are dropped, a whole turn
 *   at a time (a user message and everything up to the next user message), until the conversation
 *   and the reserve fit. The new message is never dropped; if it does not fit even alone with
 *   the system prompt, send() throws.
 */
export type ContextOverflow = 'error' | 'drop-oldest';
export const CONTEXT_OVERFLOW: readonly ContextOverflow[] = ['error', 'drop-oldest'];

/** What rendering needs of a tokenizer (lib/llm/tokenizer.ts's Tokenizer provides it). */
export interface ChatRenderer {
  readonly bos: number | undefined;
  readonly addBos: boolean;
  encode(text: string, options?: { addSpecial?: boolean; parseSpecial?: boolean }): number[];
  applyChatTemplate(messages: readonly ChatMessage[], options?: { addGenerationPrompt?: boolean }): string;
}

/**
 * The tokens of `messages` rendered with the chat template, ending with the assistant's header.
 * The same rule as LanguageModel.generate(messages): control tokens in the rendered text are
 * parsed, and BOS is added only when the vocabulary asks for it and the template did not write it.
 */
export function renderChat(tokenizer: ChatRenderer, messages: readonly ChatMessage[]): number[] {
  const text = tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true });
  const tokens = tokenizer.encode(text, { addSpecial: false, parseSpecial: true });
  const bos = tokenizer.bos;
  if (tokenizer.addBos && bos !== undefined && tokens[0] !== bos) tokens.unshift(bos);
  return tokens;
}

/** Length of the longest common prefix of two token lists. */
export function commonPrefixLength(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/**
 * How many cached tokens a turn keeps: the common prefix of the cache and the new prompt, but at
 * least one prompt token is always evaluated, because its logits sample the reply's first token.
 */
export function reusableTokens(cached: ArrayLike<number>, prompt: ArrayLike<number>): number {
  return Math.min(commonPrefixLength(cached, prompt), prompt.length - 1);
}

/**
 * Where the droppable turns of a conversation start: after the leading system messages, each
 * 'user' message opens a turn (messages before the first user message form one turn of their
 * own). The last entry is messages.length.
 */
export function turnBoundaries(messages: readonly ChatMessage[]): { pinned: number; starts: number[] } {
  let pinned = 0;
  while (pinned < messages.length && messages[pinned]!.role === 'system') pinned++;
  const starts: number[] = [];
  for (let i = pinned; i < messages.length; i++) {
    if (i === pinned || messages[i]!.role === 'user') starts.push(i);
  }
  starts.push(messages.length);
  return { pinned, starts };
}

export interface FittedConversation {
  /** The messages the turn renders (the leading system messages, the kept turns, the new message). */
  messages: ChatMessage[];
  tokens: number[];
  /** Messages dropped from the front of the history (after the system messages). */
  dropped: number;
}

/**
 * Renders `history` followed by `next` and applies the overflow policy so that the rendered
 * tokens plus `reserve` fit `contextSize`. `history` is never modified.
 */
export function fitConversation(where: string, render: (messages: readonly ChatMessage[]) => number[],
  history: readonly ChatMessage[], next: ChatMessage, contextSize: number, reserve: number,
  policy: ContextOverflow): FittedConversation {
  const limit = contextSize - reserve;
  const all = [...history, next];
  const tokens = render(all);
  if (tokens.length <= limit) return { messages: all, tokens, dropped: 0 };
  const sizes = `the conversation renders to ${tokens.length} tokens, which with the reply reserve of ${reserve} is more than the context of ${contextSize} tokens`;
  if (policy === 'error') {
    throw new InvalidArgumentError(`${where}: ${sizes} (contextOverflow 'error'; 'drop-oldest' drops the oldest turns instead)`);
  }
  // Turns are dropped whole, oldest first. Fewer turns render to fewer tokens, so the smallest
  // number of dropped turns that fits is found by bisection (a handful of renders, not one per turn).
  const { pinned, starts } = turnBoundaries(history);
  const turns = starts.length - 1;
  const keep = (k: number): ChatMessage[] => [...history.slice(0, pinned), ...history.slice(starts[k]!), next];
  let lo = 1;
  let hi = turns;
  let best: { k: number; tokens: number[] } | undefined;
  while (lo <= hi) {
    const k = (lo + hi) >> 1;
    const t = render(keep(k));
    if (t.length <= limit) { best = { k, tokens: t }; hi = k - 1; } else lo = k + 1;
  }
  if (!best) {
    const least = turns > 0 ? render(keep(turns)).length : tokens.length;
    throw new InvalidArgumentError(`${where}: the new message with the system prompt alone renders to ${least} tokens, which with the reply reserve of ${reserve} is more than the context of ${contextSize} tokens (nothing is left to drop)`);
  }
  return { messages: keep(best.k), tokens: best.tokens, dropped: starts[best.k]! - pinned };
}

/** A user message from send()'s argument: a string or a { role, content } message. */
export function toMessage(where: string, message: unknown): ChatMessage {
  if (typeof message === 'string') return { role: 'user', content: message };
  if (message !== null && typeof message === 'object' && !Array.isArray(message) && typeof (message as ChatMessage).role === 'string') {
    return { ...(message as ChatMessage) };
  }
  throw new InvalidArgumentError(`${where}(message) must be a string or a chat message { role, content }, got ${describe(message)}`);
}

/**
 * Tokens kept free for the reply when fitting the conversation: `replyReserve` when given, else
 * maxTokens when given, else a quarter of the context (at most 256 tokens).
 */
export function replyReserve(where: string, contextSize: number, reserve: unknown, maxTokens: number | undefined): number {
  if (reserve !== undefined) return checkInt(`${where}: options.replyReserve`, reserve, 0, contextSize - 1);
  if (maxTokens !== undefined && Number.isFinite(maxTokens)) return Math.min(maxTokens, contextSize - 1);
  return Math.min(256, Math.floor(contextSize / 4));
}

// ---------------------------------------------------------------------------------------------
// Chat: the conversation object over a retained sequence.

/** A sequence whose KV blocks stay between turns (the scheduler's retained sequence). */
export interface ChatSequence {
  /** Token ids whose K/V the sequence holds, in position order. */
  readonly tokens: readonly number[];
  /**
   * Keeps the longest common prefix of the held tokens and `prompt` (at least the last prompt
   * token is evaluated), evaluates the rest, then streams the reply as LanguageModel.generate
   * does. Afterwards the sequence holds the prompt and the reply tokens it evaluated.
   */
  generate(prompt: readonly number[], options: ChatGenerateOptions): AsyncIterableIterator<GeneratedToken>;
  /**
   * Ends the turn generate() started: `keep` (the reply ended, or was closed early) holds what
   * that generation left in the cache from now on; otherwise (it failed or was aborted) the
   * sequence goes back to the tokens it held before, as the conversation does.
   */
  settle(keep: boolean): void;
  /** The held tokens and the bytes of the blocks that cover them (KvPool.readBlocks), in position order. */
  snapshot(): Promise<{ tokens: Int32Array; blocks: Uint8Array }>;
  dispose(): void;
}

/** What a chat needs of its model. */
export interface ChatHost {
  readonly contextSize: number;
  readonly vocabSize: number;
  readonly tokenizer: ChatRenderer;
  /** The cache layout a saved state must have (the pool's dtype, block size and block bytes). */
  readonly layout: KvStateLayout;
  identity(): Promise<KvStateModel>;
  /** A new, empty retained sequence. */
  retain(): ChatSequence;
  /** A retained sequence holding `tokens`, its blocks written from `blocks` (a saved state's). */
  restore(tokens: Int32Array, blocks: Uint8Array): Promise<ChatSequence>;
}

export interface ChatGenerateOptions extends SamplingOptions {
  maxTokens?: number;
  stop?: string | number | readonly (string | number)[];
  signal?: AbortSignal;
  /** A reasoning model's `<think>` section: shown (marked `reasoning: true`) or hidden, as in LanguageModel.generate. */
  reasoning?: 'show' | 'hide';
}

export interface ChatOptions extends SamplingOptions {
  /** A system message that opens the conversation (and is never dropped). */
  system?: string;
  /** What send() does when the conversation outgrows the context (default 'error'); see ContextOverflow. */
  contextOverflow?: ContextOverflow;
  /** Tokens kept free for each reply when fitting the conversation; see replyReserve(). */
  replyReserve?: number;
  /** Default most tokens of a reply. */
  maxTokens?: number;
  /** Default stop strings and tokens of a reply (end-of-generation tokens always stop). */
  stop?: string | number | readonly (string | number)[];
}

export interface ChatSendOptions extends ChatGenerateOptions {
  replyReserve?: number;
}

/** The stream of one reply; text() gives the whole reply once it has ended. */
export interface ChatReply extends AsyncIterableIterator<GeneratedToken> {
  /** Reads what is left of the stream and resolves to the whole reply's text. */
  text(): Promise<string>;
}

/** What a saved state's chat section holds. */
interface SavedChat {
  messages: ChatMessage[];
  options: ChatOptions;
}

export const CHAT_OPTIONS = [...SAMPLING_OPTIONS, 'system', 'contextOverflow', 'replyReserve', 'maxTokens', 'stop'] as const;
export const CHAT_SEND_OPTIONS = [...SAMPLING_OPTIONS, 'maxTokens', 'stop', 'signal', 'reasoning', 'replyReserve'] as const;

function checkChatOptions(where: string, options: unknown, contextSize: number): ChatOptions {
  const o = checkOptions<ChatOptions>(where, options, CHAT_OPTIONS);
  if (o.system !== undefined && typeof o.system !== 'string') throw new InvalidArgumentError(`${where}: options.system must be a string, got ${describe(o.system)}`);
  if (o.contextOverflow !== undefined) checkOneOf(`${where}: options.contextOverflow`, o.contextOverflow, CONTEXT_OVERFLOW);
  if (o.replyReserve !== undefined) checkInt(`${where}: options.replyReserve`, o.replyReserve, 0, contextSize - 1);
  if (o.maxTokens !== undefined) checkInt(`${where}: options.maxTokens`, o.maxTokens, 0);
  // The sampler names any bad sampling option now rather than at the first send.
  const sampling: SamplingOptions = {};
  for (const k of SAMPLING_OPTIONS) if (o[k] !== undefined) (sampling as Record<string, unknown>)[k] = o[k];
  new Sampler(sampling, where);
  return { ...o };
}

/**
 * A conversation with a model (LanguageModel.chat): its messages, and a retained sequence whose
 * KV blocks hold the conversation so far. One reply streams at a time.
 */
export class Chat {
  #host: ChatHost;
  #sequence: ChatSequence;
  #messages: ChatMessage[];
  #options: ChatOptions;
  #streaming = false;
  #disposed = false;

  /** @internal use LanguageModel.chat() or LanguageModel.restoreChat() */
  constructor(host: ChatHost, sequence: ChatSequence, options: ChatOptions, messages?: ChatMessage[]) {
    this.#host = host;
    this.#sequence = sequence;
    this.#options = options;
    this.#messages = messages ?? (options.system !== undefined ? [{ role: 'system', content: options.system }] : []);
  }

  /** The conversation so far (a copy): system message, then user and assistant turns. */
  get messages(): ChatMessage[] {
    return structuredClone(this.#messages);
  }

  /** Tokens the chat's cache holds now. */
  get cachedTokens(): number {
    return this.#disposed ? 0 : this.#sequence.tokens.length;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /**
   * Sends a user message (or any { role, content } message) and streams the assistant's reply.
   * The turn is rendered when the stream is first read; the conversation keeps the message and
   * the reply once the stream ends (also when it is closed early: the reply is what was read),
   * and is left as it was if the reply fails or is aborted. A second send() while a reply is
   * streaming is an InvalidArgumentError.
   */
  send(message: string | ChatMessage, options?: ChatSendOptions): ChatReply {
    const where = 'Chat.send';
    this.#checkAlive(where);
    const next = toMessage(where, message);
    const o = checkOptions<ChatSendOptions>(where, options, CHAT_SEND_OPTIONS);
    if (this.#streaming) throw new InvalidArgumentError(`${where}: the previous reply is still streaming; read it to the end or close it first`);
    // This send's options over the chat's defaults; the sampler names any bad sampling option.
    const merged: ChatSendOptions = { ...this.#options, ...o };
    delete (merged as ChatOptions).system;
    delete (merged as ChatOptions).contextOverflow;
    const sampling: SamplingOptions = {};
    for (const k of SAMPLING_OPTIONS) if (merged[k] !== undefined) (sampling as Record<string, unknown>)[k] = merged[k];
    new Sampler(sampling, where);
    if (merged.maxTokens !== undefined) checkInt(`${where}: options.maxTokens`, merged.maxTokens, 0);
    checkSignal(`${where}: options.signal`, merged.signal);
    if (merged.reasoning !== undefined) checkOneOf(`${where}: options.reasoning`, merged.reasoning, ['show', 'hide'] as const);
    const reserve = replyReserve(where, this.#host.contextSize, merged.replyReserve, merged.maxTokens);
    delete merged.replyReserve;
    const generateOptions = merged as ChatGenerateOptions;
    let text = '';
    const stream = this.#turn(where, next, reserve, generateOptions, (t) => { text += t; });
    const reply: ChatReply = {
      next: () => stream.next(),
      return: (value?: unknown) => stream.return(value as undefined),
      throw: (err?: unknown) => stream.throw(err),
      [Symbol.asyncIterator]() { return reply; },
      text: async () => {
        for (let r = await stream.next(); !r.done; r = await stream.next());
        return text;
      },
    };
    return reply;
  }

  async *#turn(where: string, next: ChatMessage, reserve: number, options: ChatGenerateOptions,
    onText: (text: string) => void): AsyncGenerator<GeneratedToken, void, undefined> {
    this.#checkAlive(where);
    if (this.#streaming) throw new InvalidArgumentError(`${where}: the previous reply is still streaming; read it to the end or close it first`);
    this.#streaming = true;
    let reply = '';
    let fit: FittedConversation | undefined;
    let failed = false;
    try {
      fit = fitConversation(where, (m) => renderChat(this.#host.tokenizer, m), this.#messages, next,
        this.#host.contextSize, reserve, this.#options.contextOverflow ?? 'error');
      for await (const t of this.#sequence.generate(fit.tokens, options)) {
        reply += t.text;
        onText(t.text);
        yield t;
      }
    } catch (err) {
      failed = true;
      throw err;
    } finally {
      // Ended, or closed early by the reader (return() at a yield): the reply is what was read.
      if (!failed && fit && !this.#disposed) this.#messages = [...fit.messages, { role: 'assistant', content: reply }];
      if (!this.#disposed) this.#sequence.settle(!failed);
      this.#streaming = false;
    }
  }

  /**
   * Saves the conversation to `path`: its messages and options, the tokens its cache holds and
   * their KV blocks, with the model's identity and a checksum (lib/llm/kv/state.ts). Written
   * atomically; LanguageModel.restoreChat(path) gives the chat back.
   */
  async save(path: string): Promise<void> {
    const where = 'Chat.save';
    this.#checkAlive(where);
    if (typeof path !== 'string' || path.length === 0) throw new InvalidArgumentError(`${where}(path): path must be a non-empty string, got ${describe(path)}`);
    if (this.#streaming) throw new InvalidArgumentError(`${where}: a reply is streaming; save between turns`);
    const [model, snap] = await Promise.all([this.#host.identity(), this.#sequence.snapshot()]);
    const chat: SavedChat = { messages: this.#messages, options: this.#options };
    await writeKvState(path, { model, kv: this.#host.layout, tokens: snap.tokens, blocks: snap.blocks, chat });
  }

  /** Releases the chat's blocks (those shared with other chats stay theirs). Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#sequence.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.dispose();
  }

  #checkAlive(where: string): void {
    if (this.#disposed) throw new DisposedError(`${where}: Chat has been disposed`);
  }

  /** @internal a chat from a saved state file, checked against the host's model and layout. */
  static async restore(host: ChatHost, path: string, options?: ChatOptions): Promise<Chat> {
    const where = 'LanguageModel.restoreChat';
    if (typeof path !== 'string' || path.length === 0) throw new InvalidArgumentError(`${where}(path): path must be a non-empty string, got ${describe(path)}`);
    const overrides = checkChatOptions(where, options, host.contextSize);
    const model = await host.identity();
    const state = await readKvState(path, { model, kv: host.layout });
    const saved = state.chat as Partial<SavedChat> | null;
    if (saved === null || typeof saved !== 'object' || !Array.isArray(saved.messages) || saved.options === null || typeof saved.options !== 'object'
      || !saved.messages.every((m) => m !== null && typeof m === 'object' && typeof (m as ChatMessage).role === 'string')) {
      throw new ModelFormatError(`${path}: the state's chat section is not a saved chat (messages and options)`);
    }
    if (state.tokens.length > host.contextSize) {
      throw new InvalidArgumentError(`${path}: the state holds ${state.tokens.length} tokens, more than this model's context of ${host.contextSize}`);
    }
    for (let i = 0; i < state.tokens.length; i++) {
      const t = state.tokens[i]!;
      if (t < 0 || t >= host.vocabSize) throw new ModelFormatError(`${path}: token ${i} is ${t}, outside the vocabulary of ${host.vocabSize}`);
    }
    const chatOptions = checkChatOptions(where, { ...saved.options, ...overrides }, host.contextSize);
    const sequence = await host.restore(state.tokens, state.blocks);
    return new Chat(host, sequence, chatOptions, saved.messages);
  }

  /** @internal */
  static create(host: ChatHost, options?: ChatOptions): Chat {
    const o = checkChatOptions('LanguageModel.chat', options, host.contextSize);
    return new Chat(host, host.retain(), o);
  }
}
