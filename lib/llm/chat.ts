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
 * This file holds the decisions that need no model: rendering, prefix diffing and the context
 * overflow policy.
 */
import { InvalidArgumentError } from '../errors.js';
import { checkInt, describe } from '../validate.js';
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
