/**
 * The block manager of the paged KV cache (issue #9): which pool block holds which positions of
 * which sequence. The native pool (KvPool, lib/llm/engine.ts) is only storage; every ownership
 * decision is made here.
 *
 * - Reference counts: a block is referenced once per sequence whose table holds it. A block with
 *   references is "used"; a published block without references is "cached" (kept for reuse until
 *   space is needed); any other block is "free".
 * - Prefix cache: a trie whose edges are whole blocks of token ids. A node is keyed by
 *   (parent node id, the exact token ids of its block), node ids are never reused, and the key
 *   compares the token ids themselves, not a hash of them. Why a trie rather than a hash chain:
 *   a match is exact by construction (no collision to rule out, no second check to get wrong),
 *   the memory cost is the token ids of a block (64 bytes for 16 positions, against tens of KB of
 *   K/V), and its children list is what lets a prompt reuse the first positions of a cached block
 *   that it diverges inside (or a finished sequence's partly filled last block): that block is
 *   copied, never written. Since a child's key names its parent's id and ids are never reused, an
 *   evicted node can never be mistaken for a later one.
 * - Eviction: unreferenced cached blocks are evicted least recently released first. Only leaves
 *   are evicted, so every cached node's ancestors stay cached (a chain never has holes). The LRU
 *   order keeps that cheap: a release walks the table from its end, so a node always enters the
 *   order after its descendants, and the oldest entry is a leaf.
 * - Copy-on-write: a block that is shared (more than one reference) or published is never
 *   written. A sequence about to write into one gets a fresh block and a [src, dst] copy that the
 *   next step performs before anything else; the source keeps a reference until that step ends.
 */
import { InternalError, InvalidArgumentError } from '../../errors.js';

export interface BlockManagerOptions {
  blockSize: number;
  maxBlocks: number;
  /** Publish full blocks and finished sequences' last blocks for reuse (default true). */
  prefixCaching?: boolean;
}

export interface BlockStats {
  total: number;
  /** Blocks referenced by at least one sequence. */
  used: number;
  /** Published blocks no sequence references, kept for prefix reuse until space is needed. */
  cached: number;
  free: number;
  /** Prompt tokens served from the cache, and prompt tokens looked up (hit rate = hit / queried). */
  hitTokens: number;
  queriedTokens: number;
  /** Cached blocks evicted to make space. */
  evictions: number;
}

interface Node {
  readonly id: number;
  readonly parent: Node | undefined;
  readonly key: string;
  /** The block's token ids (fewer than blockSize for a finished sequence's last block). */
  readonly tokens: readonly number[];
  readonly block: number;
  readonly children: Map<string, Node>;
  /** The children by their first token: a prompt that diverges inside a block looks only there. */
  readonly byFirst: Map<number, Node[]>;
}

/**
 * One sequence's view of the pool: its block table and the token ids its cache holds. Owned by
 * the BlockManager that opened it; read `blocks`, `tokens` and `length`, change it only through
 * the manager.
 */
export class SequenceBlocks {
  /** Block ids in position order. May run past `length` (blocks reserved by a step that failed). */
  readonly blocks: number[] = [];
  /** Token ids at positions [0, length): what the cache holds for this sequence. */
  readonly tokens: number[] = [];
  /** chain[i]: the trie node whose tokens block i holds (its own or an equal one), if known. */
  readonly chain: (Node | undefined)[] = [];
  released = false;

  get length(): number {
    return this.tokens.length;
  }

  /** The table as a step takes it: the blocks covering [0, end). */
  table(end: number, blockSize: number): Int32Array {
    return Int32Array.from(this.blocks.slice(0, Math.ceil(end / blockSize)));
  }
}

const keyOf = (tokens: readonly number[]) => tokens.join(',');

export class BlockManager {
  readonly blockSize: number;
  readonly maxBlocks: number;
  readonly prefixCaching: boolean;
  /** References per block id, for the ids handed out so far (the rest are fresh). */
  readonly #refs: number[] = [];
  /** The node a block is published as, if any. */
  readonly #nodeOf = new Map<number, Node>();
  /** Freed block ids, reused first; then fresh ids in increasing order, so the native pool grows its memory only as far as ids are used. */
  readonly #free: number[] = [];
  #fresh = 0;
  /** Cached (published, unreferenced) blocks in release order, oldest first. */
  readonly #lru = new Map<number, Node>();
  readonly #root: Node;
  #nextNodeId = 1;
  #used = 0;
  #copies: number[] = [];
  /** Copy sources referenced until the step that copies them has ended. */
  #copySources: number[] = [];
  #hitTokens = 0;
  #queriedTokens = 0;
  #evictions = 0;

  constructor(options: BlockManagerOptions) {
    this.blockSize = options.blockSize;
    this.maxBlocks = options.maxBlocks;
    this.prefixCaching = options.prefixCaching ?? true;
    if (!Number.isInteger(this.blockSize) || this.blockSize < 1) throw new InvalidArgumentError(`BlockManager: blockSize must be an integer >= 1, got ${this.blockSize}`);
    if (!Number.isInteger(this.maxBlocks) || this.maxBlocks < 1) throw new InvalidArgumentError(`BlockManager: maxBlocks must be an integer >= 1, got ${this.maxBlocks}`);
    this.#root = { id: 0, parent: undefined, key: '', tokens: [], block: -1, children: new Map(), byFirst: new Map() };
  }

  stats(): BlockStats {
    const cached = this.#lru.size;
    return {
      total: this.maxBlocks, used: this.#used, cached, free: this.maxBlocks - this.#used - cached,
      hitTokens: this.#hitTokens, queriedTokens: this.#queriedTokens, evictions: this.#evictions,
    };
  }

  /** Blocks a sequence could take now: free ones and cached ones (evicted on demand). */
  get available(): number {
    return this.maxBlocks - this.#used;
  }

  refCount(block: number): number {
    return this.#refs[block] ?? 0;
  }

  isPublished(block: number): boolean {
    return this.#nodeOf.has(block);
  }

  /** Positions after `seq.length` that reserve() could make writable now. */
  capacity(seq: SequenceBlocks): number {
    const bs = this.blockSize;
    const start = seq.length;
    const held = seq.blocks.length * bs - start;
    if (!this.#needsCopy(seq)) return held + this.available * bs;
    return this.available === 0 ? 0 : held + (this.available - 1) * bs;
  }

  /** Blocks that reserve(seq, count) would take. */
  blocksToGrow(seq: SequenceBlocks, count: number): number {
    return Math.max(0, this.blocksFor(seq.length + count) - seq.blocks.length) + (this.#needsCopy(seq) ? 1 : 0);
  }

  /** Blocks needed to hold `length` positions. */
  blocksFor(length: number): number {
    return Math.ceil(length / this.blockSize);
  }

  /**
   * A sequence holding the longest cached prefix of `tokens` of at most `limit` tokens (a
   * prompt's limit is its length - 1: its last token must be computed, for its logits). Takes a
   * reference on every block it reuses. `countHit: false` leaves the hit statistics alone (a
   * sequence resumed after preemption is not a new request).
   */
  open(tokens: readonly number[], limit: number, countHit = true): SequenceBlocks {
    const seq = new SequenceBlocks();
    if (!this.prefixCaching) return seq;
    if (limit <= 0) {
      if (countHit) this.recordLookup(tokens.length, 0);
      return seq;
    }
    const bs = this.blockSize;
    let node = this.#root;
    let at = 0;
    while (at + bs <= limit) {
      const child = node.children.get(keyOf(tokens.slice(at, at + bs)));
      if (!child) break;
      this.#take(seq, child.block, child);
      for (let i = 0; i < bs; i++) seq.tokens.push(tokens[at + i]!);
      node = child;
      at += bs;
    }
    // Inside a block: the first positions of the child that agrees longest (copied before any write).
    let best: Node | undefined;
    let bestLength = 0;
    const room = Math.min(limit - at, bs);
    if (room > 0) {
      for (const child of node.byFirst.get(tokens[at]!) ?? []) {
        let n = 0;
        const max = Math.min(room, child.tokens.length);
        while (n < max && child.tokens[n] === tokens[at + n]) n++;
        if (n > bestLength) { best = child; bestLength = n; }
      }
    }
    if (best) {
      this.#take(seq, best.block, undefined);
      for (let i = 0; i < bestLength; i++) seq.tokens.push(tokens[at + i]!);
    }
    if (countHit) this.recordLookup(tokens.length, seq.length);
    return seq;
  }

  /** Counts a prompt of `queried` tokens of which `hit` came from the cache (hit-rate statistics). */
  recordLookup(queried: number, hit: number): void {
    this.#queriedTokens += queried;
    this.#hitTokens += hit;
  }

  /** A second sequence over the first `length` positions of `seq`, sharing its blocks (copy-on-write). */
  fork(seq: SequenceBlocks, length = seq.length): SequenceBlocks {
    if (seq.released) throw new InvalidArgumentError('BlockManager.fork: the sequence has been released');
    if (!(length >= 0 && length <= seq.length)) throw new InvalidArgumentError(`BlockManager.fork: length ${length} is outside [0, ${seq.length}]`);
    const out = new SequenceBlocks();
    const n = this.blocksFor(length);
    for (let i = 0; i < n; i++) this.#take(out, seq.blocks[i]!, (i + 1) * this.blockSize <= length ? seq.chain[i] : undefined);
    out.tokens.push(...seq.tokens.slice(0, length));
    return out;
  }

  /**
   * Makes positions [length, length + count) of `seq` writable: a shared or published block there
   * is replaced by a fresh copy (the copy is queued for the next step), missing blocks are taken
   * (evicting cached ones, least recently used first). All or nothing: false, and no change, when
   * there are not enough blocks.
   */
  reserve(seq: SequenceBlocks, count: number): boolean {
    if (seq.released) throw new InternalError('BlockManager.reserve: the sequence has been released');
    const bs = this.blockSize;
    const start = seq.length;
    const end = start + count;
    const first = Math.floor(start / bs);
    const cow = this.#needsCopy(seq);
    const missing = Math.max(0, this.blocksFor(end) - seq.blocks.length);
    if (missing + (cow ? 1 : 0) > this.available) return false;
    if (cow) {
      const src = seq.blocks[first]!;
      const dst = this.#allocate();
      this.#refs[dst] = 1;
      this.#used++;
      seq.blocks[first] = dst;
      seq.chain[first] = undefined;
      // The source keeps this sequence's reference until the copy has run (endStep).
      this.#copies.push(src, dst);
      this.#copySources.push(src);
    }
    for (let i = 0; i < missing; i++) {
      const b = this.#allocate();
      this.#refs[b] = 1;
      this.#used++;
      seq.blocks.push(b);
      seq.chain.push(undefined);
    }
    // A block past `end` reserved by a failed step is still private: it is simply reused.
    return true;
  }

  /** The copies queued since the last call, for the next step ([src0, dst0, ...]). */
  takeCopies(): Int32Array | undefined {
    if (this.#copies.length === 0) return undefined;
    const out = Int32Array.from(this.#copies);
    this.#copies = [];
    return out;
  }

  /** The step that ran the taken copies has ended (or failed): their sources may go. */
  endStep(): void {
    const sources = this.#copySources;
    this.#copySources = [];
    for (const b of sources) this.#unref(b);
  }

  /**
   * A step wrote `tokens` at positions [length, ...) of `seq`: records them and publishes the
   * blocks they fill.
   */
  append(seq: SequenceBlocks, tokens: ArrayLike<number>): void {
    const bs = this.blockSize;
    const before = seq.length;
    for (let i = 0; i < tokens.length; i++) seq.tokens.push(tokens[i]!);
    if (!this.prefixCaching) return;
    for (let i = Math.floor(before / bs); i < Math.floor(seq.length / bs); i++) this.#publish(seq, i, bs);
  }

  /**
   * Forgets positions >= length of `seq` (to continue it differently): blocks wholly past the end
   * are released; a kept partial block that is shared or published is copied on the next write.
   */
  truncate(seq: SequenceBlocks, length: number): void {
    if (!(length >= 0 && length <= seq.length)) throw new InvalidArgumentError(`BlockManager.truncate: length ${length} is outside [0, ${seq.length}]`);
    const keep = this.blocksFor(length);
    for (let i = seq.blocks.length - 1; i >= keep; i--) this.#unref(seq.blocks[i]!);
    seq.blocks.length = keep;
    seq.chain.length = keep;
    seq.tokens.length = length;
    if (length % this.blockSize !== 0 && keep > 0) seq.chain[keep - 1] = undefined;
  }

  /**
   * Drops `seq`'s references. `publish: true` (a sequence whose cache is valid) first publishes
   * its partly filled last block, so a later prompt that extends it (the next turn of a chat) can
   * start from it; a sequence cut by a failed step publishes nothing more.
   */
  release(seq: SequenceBlocks, publish: boolean): void {
    if (seq.released) return;
    seq.released = true;
    const tail = seq.length % this.blockSize;
    const last = this.blocksFor(seq.length) - 1;
    if (publish && this.prefixCaching && tail !== 0 && last >= 0) this.#publish(seq, last, tail);
    // From the end: a node enters the LRU order after its descendants (see the header).
    for (let i = seq.blocks.length - 1; i >= 0; i--) this.#unref(seq.blocks[i]!);
    seq.blocks.length = 0;
    seq.chain.length = 0;
  }

  /** Drops every cached block (for tests and for a cache reset). */
  clearCache(): void {
    while (this.#lru.size > 0) this.#evictOne();
  }

  /** Whether the next write into `seq` lands in a block it may not write (shared or published). */
  #needsCopy(seq: SequenceBlocks): boolean {
    const at = seq.length;
    const i = Math.floor(at / this.blockSize);
    return at % this.blockSize !== 0 && i < seq.blocks.length && !this.#writable(seq.blocks[i]!);
  }

  #writable(block: number): boolean {
    return this.#refs[block] === 1 && !this.#nodeOf.has(block);
  }

  #take(seq: SequenceBlocks, block: number, node: Node | undefined): void {
    if (this.#refs[block]!++ === 0) {
      this.#used++;
      this.#lru.delete(block);
    }
    seq.blocks.push(block);
    seq.chain.push(node);
  }

  #unref(block: number): void {
    const r = --this.#refs[block]!;
    if (r > 0) return;
    if (r < 0) throw new InternalError(`BlockManager: block ${block} released more often than taken`);
    this.#used--;
    const node = this.#nodeOf.get(block);
    if (node) {
      this.#lru.delete(block);
      this.#lru.set(block, node);
    } else {
      this.#free.push(block);
    }
  }

  #publish(seq: SequenceBlocks, index: number, count: number): void {
    const parent = index === 0 ? this.#root : seq.chain[index - 1];
    if (!parent || seq.chain[index]) return;
    // Only under a parent held in this table: a node then always has its parent's block
    // referenced by whoever references it, which the LRU order (leaves first) relies on.
    if (index > 0 && parent.block !== seq.blocks[index - 1]) return;
    const block = seq.blocks[index]!;
    if (this.#nodeOf.has(block)) return;
    const tokens = seq.tokens.slice(index * this.blockSize, index * this.blockSize + count);
    const key = keyOf(tokens);
    const existing = parent.children.get(key);
    // Computed twice (two sequences prefilled the same prefix at once): this copy stays private
    // and is freed with its sequence, and so do the blocks after it.
    if (existing) return;
    const node: Node = { id: this.#nextNodeId++, parent, key, tokens, block, children: new Map(), byFirst: new Map() };
    parent.children.set(key, node);
    const siblings = parent.byFirst.get(tokens[0]!);
    if (siblings) siblings.push(node);
    else parent.byFirst.set(tokens[0]!, [node]);
    this.#nodeOf.set(block, node);
    if (count === this.blockSize) seq.chain[index] = node;
  }

  #allocate(): number {
    const b = this.#free.pop();
    if (b !== undefined) return b;
    if (this.#fresh < this.maxBlocks) {
      this.#refs.push(0);
      return this.#fresh++;
    }
    return this.#evictOne();
  }

  #evictOne(): number {
    // The oldest entry is a leaf but for one case: a copy source released at the end of a step,
    // after its sequence's earlier blocks. Looking on to the first leaf covers it.
    let victim: [number, Node] | undefined;
    for (const entry of this.#lru) {
      if (entry[1].children.size === 0) { victim = entry; break; }
    }
    if (!victim) throw new InternalError('BlockManager: no free or cached block to allocate (reserve checks availability first)');
    const [block, node] = victim;
    this.#lru.delete(block);
    const parent = node.parent!;
    parent.children.delete(node.key);
    const siblings = parent.byFirst.get(node.tokens[0]!)!;
    siblings.splice(siblings.indexOf(node), 1);
    if (siblings.length === 0) parent.byFirst.delete(node.tokens[0]!);
    this.#nodeOf.delete(block);
    this.#evictions++;
    return block;
  }
}
