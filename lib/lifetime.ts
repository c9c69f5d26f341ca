/** Lifetime of objects that hold native memory: idempotent dispose(), `await using`, abort wiring. */
import { native, type NativeCancelToken } from './binding.js';
import { AbortError, DisposedError } from './errors.js';

export abstract class NativeResource {
  #disposed = false;

  /** Frees native memory now. Idempotent; later calls on this object throw DisposedError. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.release();
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.dispose();
  }

  protected abstract release(): void;

  protected checkAlive(where: string): void {
    if (this.#disposed) throw new DisposedError(`${where}: ${this.constructor.name} has been disposed`);
  }
}

/**
 * Starts a cancellable native call: rejects with AbortError at once if `signal` is already aborted,
 * and otherwise cancels the native work (between tiles) when the signal fires. A signal that fires
 * before the call settles always gives AbortError, also when the work had just finished: whether a
 * short run beat the abort is a race the caller should not see.
 */
export async function withSignal<T>(signal: AbortSignal | undefined, start: (token: NativeCancelToken | undefined) => Promise<T>): Promise<T> {
  if (!signal) return start(undefined);
  if (signal.aborted) throw new AbortError(undefined, { cause: signal.reason });
  const token = new (native().CancelToken)();
  const onAbort = () => token.cancel();
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    const result = await start(token);
    if (signal.aborted) throw new AbortError(undefined, { cause: signal.reason });
    return result;
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}
