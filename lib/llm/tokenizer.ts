/**
 * Tokenizers built from GGUF metadata (tokenizer.ggml.*), matching llama.cpp token for token:
 *
 * - 'llama': SentencePiece BPE. Text is split into code points, adjacent pairs whose concatenation
 *   is a vocabulary piece are merged highest score first (ties: leftmost), spaces become '▁' and a
 *   space is prepended to each text fragment (add_space_prefix); characters with no piece fall back
 *   to their UTF-8 bytes as <0xNN> tokens, or to the unknown token when the vocabulary has none.
 * - 'gpt2': byte-level BPE. A pre-tokeniser regex chosen by tokenizer.ggml.pre splits text into
 *   words, each word's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode
 *   table) and merged by the rank of tokenizer.ggml.merges (lowest first, ties: leftmost).
 *
 * Control (token_type 3) and unknown (2) tokens are matched as whole tokens in the text only with
 * parseSpecial; user-defined tokens (4) always are, as in llama.cpp and HF tokenizers.
 *
 * decode() follows llama_detokenize(remove_special = false): control tokens render as '' (or their
 * text with { special: true }), SentencePiece vocabularies drop the one space their encoder added
 * in front of the first token, and the BPE pre-tokenisers that llama.cpp marks clean_spaces remove
 * the space before . , ! ? and some contractions (cleanUpSpaces: false keeps the text verbatim).
 * createDecoder() streams raw pieces: the concatenation of its output equals
 * decode(tokens, { cleanUpSpaces: false, stripLeadingSpace: false }).
 */
import { Template } from '@huggingface/jinja';
import { InvalidArgumentError, ModelFormatError, UnsupportedOperatorError } from '../errors.js';
import { checkOptions, describe } from '../validate.js';
import type { GgufValue } from './gguf.js';

export type TokenizerModel = 'llama' | 'gpt2';

/** GGUF token_type values (llama.cpp's llama_token_type). */
export const TOKEN_TYPE = { undefined: 0, normal: 1, unknown: 2, control: 3, userDefined: 4, unused: 5, byte: 6 } as const;

export interface EncodeOptions {
  /** Add BOS / EOS as the vocabulary asks (tokenizer.ggml.add_bos_token / add_eos_token). Default true. */
  addSpecial?: boolean;
  /** Turn the text of control tokens ('<|im_start|>', '<s>') into those tokens. Default false. */
  parseSpecial?: boolean;
}

export interface DecodeOptions {
  /** Render control and unknown tokens as their text. Default false (they render as ''). */
  special?: boolean;
  /** llama.cpp's clean_up_tokenization_spaces. Default: what the vocabulary's pre-tokeniser uses. */
  cleanUpSpaces?: boolean;
  /** Drop the space a SentencePiece encoder added in front of the first piece. Default: add_space_prefix. */
  stripLeadingSpace?: boolean;
}

export interface StreamDecoder {
  /** The text that token completes: only whole UTF-8 characters; an incomplete one waits for the next token. */
  push(token: number): string;
  /** Whatever is still held back (an incomplete character at the end becomes U+FFFD). */
  flush(): string;
}

export interface ChatMessage {
  role: string;
  content?: unknown;
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** End with the header that starts the assistant's turn. Default true. */
  addGenerationPrompt?: boolean;
  /** A Jinja template to use instead of tokenizer.chat_template. */
  template?: string;
  /** More variables for the template (tools, date_string, ...). */
  variables?: Record<string, unknown>;
}

const enum Attr {
  Undefined = 0, Unknown = 1 << 0, Unused = 1 << 1, Normal = 1 << 2, Control = 1 << 3,
  UserDefined = 1 << 4, Byte = 1 << 5,
}

function attrOf(type: number): number {
  switch (type) {
    case TOKEN_TYPE.unknown: return Attr.Unknown;
    case TOKEN_TYPE.unused: return Attr.Unused;
    case TOKEN_TYPE.normal: return Attr.Normal;
    case TOKEN_TYPE.control: return Attr.Control;
    case TOKEN_TYPE.userDefined: return Attr.UserDefined;
    case TOKEN_TYPE.byte: return Attr.Byte;
    default: return Attr.Undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenisers (gpt2 vocabularies). Each is a list of regexes applied in turn: every regex splits
// each piece the previous ones produced, keeping the text between matches as pieces of its own.

const GPT2_SPLIT = String.raw`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`;
const CONTRACTIONS_ANY_CASE = String.raw`(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])`;
const LLAMA3_SPLIT = String.raw`${CONTRACTIONS_ANY_CASE}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`;
const QWEN2_SPLIT = String.raw`${CONTRACTIONS_ANY_CASE}|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`;

interface PreTokenizer {
  regexes: readonly RegExp[];
  /** llama.cpp's clean_spaces for this pre-tokeniser. */
  cleanSpaces: boolean;
  /** A whole word that is a vocabulary token is emitted as is (tokenizer ignore_merges). */
  ignoreMerges: boolean;
  /** BOS is added unless tokenizer.ggml.add_bos_token says otherwise. */
  addBos: boolean;
}

const rx = (...sources: string[]) => sources.map((s) => new RegExp(s, 'gu'));

function preTokenizer(pre: string): PreTokenizer {
  const base = { cleanSpaces: true, ignoreMerges: false, addBos: false };
  switch (pre) {
    case 'default':
      return { ...base, regexes: rx(String.raw`[\p{P}\$\+<=>\^~\|]+`, GPT2_SPLIT, String.raw`\p{N}+`, '[0-9][0-9][0-9]') };
    case 'gpt-2': case 'gpt2': case 'phi-2': case 'mpt': case 'olmo': case 'jais':
      return { ...base, regexes: rx(GPT2_SPLIT) };
    case 'starcoder': case 'refact': case 'codeshell':
      return { ...base, regexes: rx(String.raw`\p{N}`, GPT2_SPLIT) };
    case 'smollm':
      return { ...base, cleanSpaces: false, regexes: rx(String.raw`\p{N}`, GPT2_SPLIT) };
    case 'llama3': case 'llama-v3': case 'llama-bpe': case 'falcon3': case 'pixtral':
      return { ...base, ignoreMerges: true, addBos: true, regexes: rx(LLAMA3_SPLIT) };
    case 'dbrx': case 'smaug-bpe':
      return { ...base, regexes: rx(LLAMA3_SPLIT) };
    case 'qwen2': case 'deepseek-r1-qwen':
      return { ...base, cleanSpaces: false, regexes: rx(QWEN2_SPLIT) };
    case 'stablelm2': case 'megrez':
      return { ...base, regexes: rx(QWEN2_SPLIT) };
    case 'deepseek-llm':
      // The letter class of DeepSeek's tokenizer.json lists the cased letters (Lu, Ll, Lt) of its
      // Unicode version; \p{LC} is that set in the Unicode version of this JS engine.
      return {
        ...base, cleanSpaces: false,
        regexes: rx('[\\r\\n]', String.raw`\s?\p{LC}+`, String.raw`\s?[!-/:-~\uFF01-\uFF0F\uFF1A-\uFF5E\u2018-\u201F\u3000-\u3002]+`,
          String.raw`\s+$`, String.raw`[\u4E00-\u9FA5\u0800-\u4E00\uAC00-\uD7FF]+`, String.raw`\p{N}+`),
      };
    case 'deepseek-coder':
      return {
        ...base, cleanSpaces: false,
        regexes: rx('[\\r\\n]', String.raw`\s?\p{L}+`, String.raw`\s?\p{P}+`, String.raw`[\u4E00-\u9FA5\u0800-\u4E00\uAC00-\uD7FF]+`, String.raw`\p{N}`),
      };
    default:
      throw new UnsupportedOperatorError(
        `tokenizer.ggml.pre '${pre}' is not supported (supported: default, gpt-2, llama-bpe (llama3), qwen2, deepseek-llm, ` +
        'deepseek-coder, starcoder, refact, codeshell, smollm, dbrx, smaug-bpe, stablelm2, phi-2, mpt, olmo, jais)',
      );
  }
}

/**
 * llama.cpp matches \s against its own whitespace table (it also maps every non-ASCII whitespace to
 * '\v' before running a regex); JS's \s differs in two code points: U+0085 is whitespace there and
 * not in JS, U+FEFF is whitespace in JS and not there. The regexes run on a copy of the text with
 * those two swapped for equivalents (same UTF-16 length, so offsets carry over).
 */
function regexView(text: string): string {
  return /[\u0085\uFEFF]/.test(text) ? text.replace(/\u0085/g, '\v').replace(/\uFEFF/g, '\u00AD') : text;
}

function splitWords(text: string, regexes: readonly RegExp[]): string[] {
  const view = regexView(text);
  // Piece boundaries as [start, end) offsets in UTF-16 units.
  let pieces: number[] = [0, text.length];
  for (const re of regexes) {
    const next: number[] = [];
    for (let i = 0; i < pieces.length; i += 2) {
      const start = pieces[i]!;
      const end = pieces[i + 1]!;
      // Each piece is matched on its own, so lookaheads and $ see the piece's end.
      const piece = view.slice(start, end);
      let at = 0;
      re.lastIndex = 0;
      for (let m = re.exec(piece); m !== null; m = re.exec(piece)) {
        if (m[0].length === 0) { re.lastIndex++; continue; }
        if (m.index > at) next.push(start + at, start + m.index);
        next.push(start + m.index, start + m.index + m[0].length);
        at = m.index + m[0].length;
      }
      if (at < end - start) next.push(start + at, end);
    }
    pieces = next;
  }
  const words: string[] = [];
  for (let i = 0; i < pieces.length; i += 2) words.push(text.slice(pieces[i]!, pieces[i + 1]!));
  return words;
}

// GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for
// themselves, the rest are shifted to U+0100 upwards so no token text contains spaces or controls.
const BYTE_TO_CHAR: string[] = [];
const CHAR_TO_BYTE = new Map<number, number>();
{
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    const cp = printable ? b : 256 + shifted++;
    BYTE_TO_CHAR.push(String.fromCodePoint(cp));
    CHAR_TO_BYTE.set(cp, b);
  }
}

const utf8 = new TextEncoder();

function byteEncode(word: string): string {
  const bytes = utf8.encode(word);
  let out = '';
  for (const b of bytes) out += BYTE_TO_CHAR[b];
  return out;
}

// ---------------------------------------------------------------------------------------------
// A binary heap of merge candidates, ordered by `better`.

interface Candidate { left: number; right: number; key: number; text: string; size: number }

class CandidateHeap {
  private items: Candidate[] = [];
  constructor(private readonly better: (a: Candidate, b: Candidate) => boolean) {}
  get size(): number { return this.items.length; }
  push(c: Candidate): void {
    const a = this.items;
    a.push(c);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.better(a[i]!, a[p]!)) break;
      [a[i], a[p]] = [a[p]!, a[i]!];
      i = p;
    }
  }
  pop(): Candidate {
    const a = this.items;
    const top = a[0]!;
    const last = a.pop()!;
    if (a.length > 0) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let best = i;
        if (l < a.length && this.better(a[l]!, a[best]!)) best = l;
        if (r < a.length && this.better(a[r]!, a[best]!)) best = r;
        if (best === i) break;
        [a[i], a[best]] = [a[best]!, a[i]!];
        i = best;
      }
    }
    return top;
  }
}

/** Symbols of a word being merged: a doubly linked list over [start, start + len) slices of `text`. */
class Symbols {
  start: number[] = [];
  len: number[] = [];
  prev: number[] = [];
  next: number[] = [];
  constructor(readonly text: string) {
    let i = 0;
    for (const ch of text) {
      const n = this.start.length;
      this.start.push(i);
      this.len.push(ch.length);
      this.prev.push(n - 1);
      i += ch.length;
      this.next.push(i === text.length ? -1 : n + 1);
    }
  }
  str(i: number): string { return this.text.slice(this.start[i]!, this.start[i]! + this.len[i]!); }
  merge(left: number, right: number): void {
    this.len[left]! += this.len[right]!;
    this.len[right] = 0;
    this.next[left] = this.next[right]!;
    if (this.next[right]! >= 0) this.prev[this.next[right]!] = left;
  }
}

// ---------------------------------------------------------------------------------------------

function asString(md: Readonly<Record<string, GgufValue>>, key: string): string | undefined {
  const v = md[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string') throw new ModelFormatError(`GGUF metadata ${key} must be a string, got ${describe(v)}`);
  return v;
}

function asBool(md: Readonly<Record<string, GgufValue>>, key: string): boolean | undefined {
  const v = md[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') throw new ModelFormatError(`GGUF metadata ${key} must be a bool, got ${describe(v)}`);
  return v;
}

function asId(md: Readonly<Record<string, GgufValue>>, key: string): number | undefined {
  const v = md[key];
  if (v === undefined) return undefined;
  const n = typeof v === 'bigint' ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isInteger(n)) throw new ModelFormatError(`GGUF metadata ${key} must be an integer token id, got ${describe(v)}`);
  return n;
}

function asArray(md: Readonly<Record<string, GgufValue>>, key: string, n: number, kind: 'number' | 'string'): unknown[] | undefined {
  const v = md[key];
  if (v === undefined) return undefined;
  if (!Array.isArray(v)) throw new ModelFormatError(`GGUF metadata ${key} must be an array, got ${describe(v)}`);
  if (n >= 0 && v.length < n) throw new ModelFormatError(`GGUF metadata ${key} has ${v.length} entries for ${n} tokens`);
  const bad = v.findIndex((e) => typeof e !== kind);
  if (bad >= 0) throw new ModelFormatError(`GGUF metadata ${key}[${bad}] must be a ${kind}, got ${describe(v[bad])}`);
  return v;
}

// Token texts llama.cpp treats as end of generation (and as control tokens) whatever their type.
const EOG_TEXTS = new Set([
  '<|eot_id|>', '<|im_end|>', '<|end|>', '<end_of_turn>', '<|endoftext|>', '<|eom_id|>', '<EOT>', '_<EOT>',
  '<|end_of_text|>', '<｜end▁of▁sentence｜>',
]);
const EOT_TEXTS = new Set([
  '<|eot_id|>', '<|im_end|>', '<|end|>', '<end_of_turn>', '<|endoftext|>', '<|end_of_text|>', '<EOT>', '_<EOT>',
  '<｜end▁of▁sentence｜>',
]);

const ENCODE_OPTIONS = ['addSpecial', 'parseSpecial'] as const;
const DECODE_OPTIONS = ['special', 'cleanUpSpaces', 'stripLeadingSpace'] as const;
const DECODER_OPTIONS = ['special'] as const;
const CHAT_OPTIONS = ['addGenerationPrompt', 'template', 'variables'] as const;

/** Longest byte-level word kept in the BPE word cache (longer ones are rare and would bloat it). */
const WORD_CACHE_MAX_WORD = 64;
const WORD_CACHE_MAX_ENTRIES = 1 << 16;

export class Tokenizer {
  readonly model: TokenizerModel;
  /** tokenizer.ggml.pre (gpt2 vocabularies; 'default' when absent). */
  readonly pre: string | undefined;
  readonly vocabSize: number;
  /** Special token ids (undefined where the vocabulary has none). */
  readonly bos: number | undefined;
  readonly eos: number | undefined;
  readonly eot: number | undefined;
  readonly unk: number | undefined;
  readonly pad: number | undefined;
  readonly addBos: boolean;
  readonly addEos: boolean;
  readonly addSpacePrefix: boolean;
  readonly chatTemplate: string | undefined;

  readonly #texts: string[];
  readonly #scores: Float64Array;
  readonly #attrs: Uint8Array;
  readonly #ids = new Map<string, number>();
  readonly #ranks = new Map<string, number>();
  readonly #pre: PreTokenizer | undefined;
  readonly #cleanSpaces: boolean;
  readonly #eog = new Set<number>();
  /** Control, user-defined and unknown tokens, longest text first (llama.cpp's partition order). */
  readonly #special: number[];
  readonly #pieces: (Uint8Array | undefined)[];
  readonly #wordCache = new Map<string, number[]>();
  #template: Template | undefined;

  private constructor(md: Readonly<Record<string, GgufValue>>) {
    const model = asString(md, 'tokenizer.ggml.model');
    if (model === undefined) throw new ModelFormatError('GGUF metadata has no tokenizer.ggml.model: the file carries no tokenizer');
    if (model !== 'llama' && model !== 'gpt2') {
      throw new UnsupportedOperatorError(`tokenizer.ggml.model '${model}' is not supported (supported: llama (SentencePiece), gpt2 (byte-level BPE))`);
    }
    this.model = model;
    const tokens = asArray(md, 'tokenizer.ggml.tokens', -1, 'string') as string[] | undefined;
    if (tokens === undefined || tokens.length === 0) throw new ModelFormatError('GGUF metadata tokenizer.ggml.tokens is missing or empty');
    const n = tokens.length;
    this.vocabSize = n;
    const scores = asArray(md, 'tokenizer.ggml.scores', n, 'number') as number[] | undefined;
    const types = asArray(md, 'tokenizer.ggml.token_type', n, 'number') as number[] | undefined;
    this.#texts = new Array<string>(n);
    this.#scores = new Float64Array(n);
    this.#attrs = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const text = tokens[i] === '' ? `[EMPTY_${i}]` : tokens[i]!;
      if (this.#ids.has(text)) throw new ModelFormatError(`duplicate token in tokenizer.ggml.tokens: '${text}' has ids ${this.#ids.get(text)} and ${i}`);
      this.#ids.set(text, i);
      this.#texts[i] = text;
      this.#scores[i] = scores ? scores[i]! : 0;
      this.#attrs[i] = types ? attrOf(types[i]!) : Attr.Normal;
    }

    let bos: number | undefined;
    let eos: number | undefined;
    let unk: number | undefined;
    let addBos: boolean;
    if (model === 'gpt2') {
      const merges = asArray(md, 'tokenizer.ggml.merges', -1, 'string') as string[] | undefined;
      if (merges === undefined) throw new ModelFormatError('GGUF metadata has no tokenizer.ggml.merges (required by gpt2 vocabularies)');
      merges.forEach((m, rank) => {
        const sp = m.indexOf(' ', 1);
        const key = sp < 0 ? '\u0000' : `${m.slice(0, sp)}\u0000${m.slice(sp + 1)}`;
        if (!this.#ranks.has(key)) this.#ranks.set(key, rank);
      });
      this.pre = asString(md, 'tokenizer.ggml.pre') ?? 'default';
      this.#pre = preTokenizer(this.pre);
      this.#cleanSpaces = this.#pre.cleanSpaces;
      addBos = this.#pre.addBos;
      bos = 11; eos = 11;
      this.addSpacePrefix = asBool(md, 'tokenizer.ggml.add_space_prefix') ?? false;
    } else {
      this.pre = undefined;
      this.#cleanSpaces = false;
      addBos = true;
      bos = 1; eos = 2; unk = 0;
      this.addSpacePrefix = asBool(md, 'tokenizer.ggml.add_space_prefix') ?? true;
    }
    const inRange = (id: number | undefined) => (id !== undefined && id >= 0 && id < n ? id : undefined);
    // Default ids outside the vocabulary are dropped; ids from the file outside it are ignored (as llama.cpp).
    const pick = (key: string, fallback: number | undefined) => inRange(asId(md, key)) ?? inRange(fallback);
    this.bos = pick('tokenizer.ggml.bos_token_id', bos);
    this.eos = pick('tokenizer.ggml.eos_token_id', eos);
    this.unk = pick('tokenizer.ggml.unknown_token_id', unk);
    this.pad = pick('tokenizer.ggml.padding_token_id', undefined);
    let eot = pick('tokenizer.ggml.eot_token_id', undefined);
    this.addBos = asBool(md, 'tokenizer.ggml.add_bos_token') ?? addBos;
    this.addEos = asBool(md, 'tokenizer.ggml.add_eos_token') ?? false;
    if (this.addBos && this.bos === undefined) throw new ModelFormatError('tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set');
    if (this.addEos && this.eos === undefined) throw new ModelFormatError('tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set');

    for (let i = 0; i < n; i++) {
      const text = this.#texts[i]!;
      if (eot === undefined && EOT_TEXTS.has(text)) eot = i;
      if (EOG_TEXTS.has(text)) {
        this.#eog.add(i);
        this.#attrs[i]! |= Attr.Control;
      }
    }
    this.eot = eot;
    for (const id of [this.eos, this.eot, inRange(asId(md, 'tokenizer.ggml.eom_token_id'))]) if (id !== undefined) this.#eog.add(id);

    this.#special = [];
    for (let i = 0; i < n; i++) if (this.#attrs[i]! & (Attr.Control | Attr.UserDefined | Attr.Unknown)) this.#special.push(i);
    this.#special.sort((a, b) => utf8Length(this.#texts[b]!) - utf8Length(this.#texts[a]!) || a - b);
    this.#pieces = new Array(n);

    const template = md['tokenizer.chat_template'];
    this.chatTemplate = typeof template === 'string' ? template : undefined;
  }

  /** A tokenizer from the metadata of a GGUF file (GgufFile.metadata). Throws ModelFormatError for a malformed vocabulary. */
  static fromGguf(metadata: Readonly<Record<string, GgufValue>>): Tokenizer {
    if (metadata === null || typeof metadata !== 'object' || Array.isArray(metadata)) {
      throw new InvalidArgumentError(`Tokenizer.fromGguf(metadata) must be a GGUF metadata object, got ${describe(metadata)}`);
    }
    return new Tokenizer(metadata);
  }

  /** The vocabulary text of a token ('▁the', 'Ġthe', '<0x0A>', '<|im_end|>'). */
  tokenText(token: number): string {
    return this.#texts[this.#checkToken('Tokenizer.tokenText(token)', token)]!;
  }

  /** The id of the token whose vocabulary text is `text`, if any. */
  tokenId(text: string): number | undefined {
    return this.#ids.get(text);
  }

  /** True for tokens that end a generation (EOS, EOT, <|im_end|>, ...). */
  isEog(token: number): boolean {
    return this.#eog.has(token);
  }

  /** True for control and unknown tokens (those decode() renders as '' unless { special: true }). */
  isSpecial(token: number): boolean {
    return (this.#attrs[this.#checkToken('Tokenizer.isSpecial(token)', token)]! & (Attr.Control | Attr.Unknown)) !== 0;
  }

  encode(text: string, options?: EncodeOptions): number[] {
    const where = 'Tokenizer.encode';
    if (typeof text !== 'string') throw new InvalidArgumentError(`${where}(text) must be a string, got ${describe(text)}`);
    const o = checkOptions<EncodeOptions>(where, options, ENCODE_OPTIONS);
    const addSpecial = checkBool(`${where}: options.addSpecial`, o.addSpecial, true);
    const parseSpecial = checkBool(`${where}: options.parseSpecial`, o.parseSpecial, false);
    // Lone surrogates cannot be UTF-8: they become U+FFFD, as when the text crosses into C++.
    const wellFormed = text.replace(/\p{Cs}/gu, '\uFFFD');
    const fragments = wellFormed.length > 0 ? this.#partition(wellFormed, parseSpecial) : [];
    const out: number[] = [];
    if (addSpecial && this.addBos) out.push(this.bos!);
    if (this.model === 'llama') {
      let prevSpecial = true;
      for (const f of fragments) {
        if (typeof f === 'number') {
          out.push(f);
          prevSpecial = true;
        } else {
          const spaced = this.addSpacePrefix && prevSpecial ? ` ${f}` : f;
          this.#spm(spaced.replaceAll(' ', '\u2581'), out);
          prevSpecial = false;
        }
      }
    } else {
      for (const f of fragments) {
        if (typeof f === 'number') out.push(f);
        else for (const word of splitWords(f, this.#pre!.regexes)) this.#bpeWord(byteEncode(word), out);
      }
    }
    if (addSpecial && this.addEos) out.push(this.eos!);
    return out;
  }

  /** Text of `tokens` (invalid UTF-8 from a split character at the ends becomes U+FFFD). */
  decode(tokens: readonly number[] | Int32Array | Uint32Array, options?: DecodeOptions): string {
    const where = 'Tokenizer.decode';
    this.#checkTokens(where, tokens);
    const o = checkOptions<DecodeOptions>(where, options, DECODE_OPTIONS);
    const special = checkBool(`${where}: options.special`, o.special, false);
    const clean = checkBool(`${where}: options.cleanUpSpaces`, o.cleanUpSpaces, this.#cleanSpaces);
    let strip = checkBool(`${where}: options.stripLeadingSpace`, o.stripLeadingSpace, this.addSpacePrefix);
    const parts: Uint8Array[] = [];
    let total = 0;
    for (const t of tokens) {
      let piece = this.#piece(t, special);
      // llama.cpp spends the strip on the first token even when that token renders as nothing (BOS).
      if (strip && piece.length > 0 && piece[0] === 0x20) piece = piece.subarray(1);
      strip = false;
      parts.push(piece);
      total += piece.length;
    }
    let bytes: Uint8Array = new Uint8Array(total);
    let at = 0;
    for (const p of parts) { bytes.set(p, at); at += p.length; }
    if (clean) bytes = cleanUpSpaces(bytes);
    return new TextDecoder('utf-8').decode(bytes);
  }

  /** The raw bytes a token stands for (a byte token or part of a multi-byte character may not be valid UTF-8 alone). */
  tokenBytes(token: number, options?: { special?: boolean }): Uint8Array {
    const where = 'Tokenizer.tokenBytes';
    this.#checkToken(`${where}(token)`, token);
    const o = checkOptions<{ special?: boolean }>(where, options, DECODER_OPTIONS);
    return this.#piece(token, checkBool(`${where}: options.special`, o.special, false)).slice();
  }

  /** A decoder for streamed tokens that never splits a UTF-8 character across two outputs. */
  createDecoder(options?: { special?: boolean }): StreamDecoder {
    const where = 'Tokenizer.createDecoder';
    const o = checkOptions<{ special?: boolean }>(where, options, DECODER_OPTIONS);
    const special = checkBool(`${where}: options.special`, o.special, false);
    // TextDecoder's stream mode holds back an incomplete trailing sequence and turns bytes that can
    // never become a character into U+FFFD at once.
    const td = new TextDecoder('utf-8');
    return {
      push: (token: number) => td.decode(this.#piece(this.#checkToken('StreamDecoder.push(token)', token), special), { stream: true }),
      flush: () => td.decode(),
    };
  }

  /**
   * Renders a chat with tokenizer.chat_template (or options.template) through @huggingface/jinja.
   * The template sees messages, add_generation_prompt, bos_token, eos_token, options.variables and
   * the jinja library's built-ins (raise_exception() among them). The result is text: encode it with { parseSpecial: true, addSpecial: false }
   * when the template writes the BOS token itself.
   */
  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string {
    const where = 'Tokenizer.applyChatTemplate';
    if (!Array.isArray(messages)) throw new InvalidArgumentError(`${where}(messages) must be an array of { role, content }, got ${describe(messages)}`);
    messages.forEach((m, i) => {
      if (m === null || typeof m !== 'object' || typeof (m as ChatMessage).role !== 'string') {
        throw new InvalidArgumentError(`${where}: messages[${i}] must be an object with a string role, got ${describe(m)}`);
      }
    });
    const o = checkOptions<ChatTemplateOptions>(where, options, CHAT_OPTIONS);
    const addGenerationPrompt = checkBool(`${where}: options.addGenerationPrompt`, o.addGenerationPrompt, true);
    if (o.template !== undefined && typeof o.template !== 'string') {
      throw new InvalidArgumentError(`${where}: options.template must be a string, got ${describe(o.template)}`);
    }
    if (o.variables !== undefined && (o.variables === null || typeof o.variables !== 'object')) {
      throw new InvalidArgumentError(`${where}: options.variables must be an object, got ${describe(o.variables)}`);
    }
    let template: Template;
    if (o.template !== undefined) {
      template = parseTemplate(o.template, `${where}: options.template`, InvalidArgumentError);
    } else {
      if (this.chatTemplate === undefined) {
        throw new ModelFormatError(`${where}: the model has no tokenizer.chat_template; pass options.template`);
      }
      this.#template ??= parseTemplate(this.chatTemplate, 'tokenizer.chat_template', ModelFormatError);
      template = this.#template;
    }
    const context: Record<string, unknown> = {
      bos_token: this.bos !== undefined ? this.#texts[this.bos] : '',
      eos_token: this.eos !== undefined ? this.#texts[this.eos] : '',
      ...o.variables,
      messages,
      add_generation_prompt: addGenerationPrompt,
    };
    try {
      return template.render(context);
    } catch (e) {
      throw new InvalidArgumentError(`${where}: rendering the chat template failed: ${(e as Error).message}`, { cause: e });
    }
  }

  // -------------------------------------------------------------------------------------------

  #checkToken(where: string, token: unknown): number {
    if (typeof token !== 'number' || !Number.isInteger(token) || token < 0 || token >= this.vocabSize) {
      throw new InvalidArgumentError(`${where} must be a token id in [0, ${this.vocabSize}), got ${describe(token)}`);
    }
    return token;
  }

  #checkTokens(where: string, tokens: unknown): void {
    if (!Array.isArray(tokens) && !(tokens instanceof Int32Array) && !(tokens instanceof Uint32Array)) {
      throw new InvalidArgumentError(`${where}(tokens) must be an array of token ids, got ${describe(tokens)}`);
    }
    const list = tokens as ArrayLike<unknown>;
    for (let i = 0; i < list.length; i++) this.#checkToken(`${where}: tokens[${i}]`, list[i]);
  }

  /** Splits text around special tokens: strings are raw text, numbers are tokens. */
  #partition(text: string, parseSpecial: boolean): (string | number)[] {
    let fragments: (string | number)[] = [text];
    for (const id of this.#special) {
      if (!parseSpecial && this.#attrs[id]! & (Attr.Control | Attr.Unknown)) continue;
      const needle = this.#texts[id]!;
      const next: (string | number)[] = [];
      for (const f of fragments) {
        if (typeof f === 'number' || !f.includes(needle)) { next.push(f); continue; }
        let at = 0;
        for (let hit = f.indexOf(needle); hit >= 0; hit = f.indexOf(needle, at)) {
          if (hit > at) next.push(f.slice(at, hit));
          next.push(id);
          at = hit + needle.length;
        }
        if (at < f.length) next.push(f.slice(at));
      }
      fragments = next;
    }
    return fragments;
  }

  /** SentencePiece merges over the whole fragment (SPM has no pre-tokeniser). */
  #spm(text: string, out: number[]): void {
    const sym = new Symbols(text);
    // Highest score first; equal scores: leftmost first.
    const heap = new CandidateHeap((a, b) => a.key > b.key || (a.key === b.key && a.left < b.left));
    const tryAdd = (left: number, right: number) => {
      if (left < 0 || right < 0) return;
      const s = text.slice(sym.start[left]!, sym.start[left]! + sym.len[left]! + sym.len[right]!);
      const id = this.#ids.get(s);
      if (id === undefined) return;
      heap.push({ left, right, key: this.#scores[id]!, text: s, size: s.length });
    };
    for (let i = 1; i < sym.start.length; i++) tryAdd(i - 1, i);
    while (heap.size > 0) {
      const c = heap.pop();
      const l = sym.len[c.left]!;
      const r = sym.len[c.right]!;
      if (l === 0 || r === 0 || l + r !== c.size) continue;
      sym.merge(c.left, c.right);
      tryAdd(sym.prev[c.left]!, c.left);
      tryAdd(c.left, sym.next[c.left]!);
    }
    if (sym.start.length === 0) return;
    for (let i = 0; i !== -1; i = sym.next[i]!) {
      const s = sym.str(i);
      const id = this.#ids.get(s);
      if (id !== undefined) { out.push(id); continue; }
      for (const b of utf8.encode(s)) {
        const byteId = this.#ids.get(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`) ?? this.#ids.get(String.fromCharCode(b));
        if (byteId !== undefined) out.push(byteId);
        else if (this.unk !== undefined) out.push(this.unk);
        else throw new ModelFormatError(`the vocabulary has no token for byte 0x${b.toString(16)} and no unknown token`);
      }
    }
  }

  /** Byte-level BPE of one pre-tokenised word (already byte-encoded), cached per word. */
  #bpeWord(word: string, out: number[]): void {
    const cached = this.#wordCache.get(word);
    if (cached !== undefined) { for (const id of cached) out.push(id); return; }
    const ids: number[] = [];
    const whole = this.#pre!.ignoreMerges ? this.#ids.get(word) : undefined;
    if (whole !== undefined) {
      ids.push(whole);
    } else {
      const sym = new Symbols(word);
      // Lowest rank first; equal ranks (the same pair twice): leftmost first.
      const heap = new CandidateHeap((a, b) => a.key < b.key || (a.key === b.key && a.left < b.left));
      const tryAdd = (left: number, right: number) => {
        if (left < 0 || right < 0) return;
        const ls = sym.str(left);
        const rs = sym.str(right);
        const rank = this.#ranks.get(`${ls}\u0000${rs}`);
        if (rank === undefined) return;
        heap.push({ left, right, key: rank, text: ls + rs, size: 0 });
      };
      for (let i = 1; i < sym.start.length; i++) tryAdd(i - 1, i);
      while (heap.size > 0) {
        const c = heap.pop();
        if (sym.len[c.left] === 0 || sym.len[c.right] === 0) continue;
        if (sym.str(c.left) + sym.str(c.right) !== c.text) continue;
        sym.merge(c.left, c.right);
        tryAdd(sym.prev[c.left]!, c.left);
        tryAdd(c.left, sym.next[c.left]!);
      }
      if (sym.start.length > 0) {
        for (let i = 0; i !== -1; i = sym.next[i]!) {
          const s = sym.str(i);
          const id = this.#ids.get(s);
          if (id !== undefined) { ids.push(id); continue; }
          // As llama.cpp: a symbol that is no token falls back to single-byte tokens of its UTF-8
          // text; only ASCII can match, anything else is dropped.
          for (const ch of s) {
            if (ch.charCodeAt(0) >= 0x80) continue;
            const b = this.#ids.get(ch);
            if (b !== undefined) ids.push(b);
          }
        }
      }
    }
    if (word.length <= WORD_CACHE_MAX_WORD) {
      if (this.#wordCache.size >= WORD_CACHE_MAX_ENTRIES) this.#wordCache.clear();
      this.#wordCache.set(word, ids);
    }
    for (const id of ids) out.push(id);
  }

  /** The bytes of one token, as llama.cpp's token_to_piece. Cached per token (special: false). */
  #piece(token: number, special: boolean): Uint8Array {
    const attr = this.#attrs[token]!;
    if (attr & (Attr.Control | Attr.Unknown)) return special ? utf8.encode(this.#texts[token]!) : EMPTY;
    const cached = this.#pieces[token];
    if (cached !== undefined) return cached;
    const text = this.#texts[token]!;
    let piece: Uint8Array;
    if (attr & Attr.UserDefined) {
      piece = utf8.encode(text);
    } else if (attr & Attr.Normal) {
      piece = this.model === 'llama' ? utf8.encode(text.replaceAll('\u2581', ' ')) : byteDecode(text);
    } else if (attr & Attr.Byte) {
      piece = Uint8Array.of(parseInt(text.slice(3, 5), 16) & 0xff);
    } else {
      piece = EMPTY;  // unused and undefined tokens render as nothing
    }
    this.#pieces[token] = piece;
    return piece;
  }
}

const EMPTY = new Uint8Array(0);

function utf8Length(s: string): number {
  return utf8.encode(s).length;
}

function byteDecode(text: string): Uint8Array {
  const out: number[] = [];
  for (const ch of text) {
    const b = CHAR_TO_BYTE.get(ch.codePointAt(0)!);
    if (b !== undefined) { out.push(b); continue; }
    // llama.cpp's marker for a character outside the byte table.
    const hex = Array.from(utf8.encode(ch), (x) => x.toString(16).padStart(2, '0')).join('');
    out.push(...utf8.encode(`[UNK_BYTE_0x${hex}${text}]`));
  }
  return Uint8Array.from(out);
}

/**
 * llama.cpp's clean_up_tokenization_spaces, on UTF-8 bytes (every character involved is ASCII).
 * Three passes over one buffer compacted in place, kept in that form because the second pass looks
 * at bytes the passes have already rewritten: the results differ from a "cleaner" rewrite on runs
 * like " ' ' ".
 */
function cleanUpSpaces(input: Uint8Array): Uint8Array {
  const SP = 0x20, QUOTE = 0x27;
  const t = Uint8Array.from(input);
  // " ?", " !", " .", " ," lose the space.
  let n = t.length;
  let total = n ? 1 : 0;
  for (let i = 1; i < n; i++) {
    const x = t[i]!;
    if (t[i - 1] === SP && (x === 0x3f || x === 0x21 || x === 0x2e || x === 0x2c)) total--;
    t[total++] = x;
  }
  // " ' " becomes "'".
  n = total;
  total = n ? 1 : 0;
  for (let i = 1; i < n; i++) {
    const x = t[i]!;
    if (x === QUOTE && i + 1 < n && t[i - 1] === SP && t[i + 1] === SP) {
      total--;
      t[++i] = 0;
    }
    t[total++] = x;
  }
  // " 's", " 'm", " 're", " 've" lose the space (" 't", " 'd", " 'll" keep it).
  n = total;
  total = n ? 1 : 0;
  for (let i = 1; i < n; i++) {
    const x = t[i]!;
    if (t[i - 1] === SP && x === QUOTE && i + 1 < n) {
      const x1 = t[i + 1];
      if (x1 === 0x73 || x1 === 0x6d) total--;
      else if (i + 2 < n && (x1 === 0x72 || x1 === 0x76) && t[i + 2] === 0x65) total--;
    }
    t[total++] = x;
  }
  return t.subarray(0, total);
}

function checkBool(where: string, v: unknown, fallback: boolean): boolean {
  if (v === undefined) return fallback;
  if (typeof v !== 'boolean') throw new InvalidArgumentError(`${where} must be a boolean, got ${describe(v)}`);
  return v;
}

/** A template from the file is a ModelFormatError when malformed; one passed in, an InvalidArgumentError. */
function parseTemplate(source: string, what: string, Err: typeof ModelFormatError | typeof InvalidArgumentError): Template {
  try {
    return new Template(source);
  } catch (e) {
    throw new Err(`${what} is not a valid Jinja template: ${(e as Error).message}`, { cause: e });
  }
}
