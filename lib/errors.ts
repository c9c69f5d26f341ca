/**
 * Error classes. Every error sonde raises is a SondeError with a stable `.code`; native code raises
 * plain errors carrying one of these codes and {@link fromNative} turns them into these classes.
 */

export type SondeErrorCode =
  | 'ERR_SONDE_INVALID_ARGUMENT'
  | 'ERR_SONDE_DEVICE_UNAVAILABLE'
  | 'ERR_SONDE_MODEL_FORMAT'
  | 'ERR_SONDE_UNSUPPORTED_OPERATOR'
  | 'ERR_SONDE_OUT_OF_MEMORY'
  | 'ERR_SONDE_DISPOSED'
  | 'ERR_SONDE_ABORTED'
  | 'ERR_SONDE_QUEUE_FULL'
  | 'ERR_SONDE_NATIVE_LOAD'
  | 'ERR_SONDE_INTERNAL';

export class SondeError extends Error {
  readonly code: SondeErrorCode;
  constructor(code: SondeErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** An argument was missing, of the wrong type or out of range; the message names it. */
export class InvalidArgumentError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_INVALID_ARGUMENT', message, options);
  }
}

/** The requested device (or kernel variant) cannot be used here; the message says why. */
export class DeviceUnavailableError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_DEVICE_UNAVAILABLE', message, options);
  }
}

/** A model file is malformed or of an unsupported version. */
export class ModelFormatError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_MODEL_FORMAT', message, options);
  }
}

/** A model uses an operator (or an operator attribute) sonde does not implement. */
export class UnsupportedOperatorError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_UNSUPPORTED_OPERATOR', message, options);
  }
}

/** An allocation failed or a configured memory cap would be exceeded. */
export class OutOfMemoryError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_OUT_OF_MEMORY', message, options);
  }
}

/** The object was disposed before (or while) this call was made. */
export class DisposedError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_DISPOSED', message, options);
  }
}

/** The call was cancelled through its AbortSignal. `name` is 'AbortError', as for fetch(). */
export class AbortError extends SondeError {
  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super('ERR_SONDE_ABORTED', message, options);
    this.name = 'AbortError';
  }
}

/** A bounded queue was full; retry later or raise the limit. */
export class QueueFullError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_QUEUE_FULL', message, options);
  }
}

/** The native addon could not be loaded; the message lists what was tried and what to do. */
export class NativeLoadError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_NATIVE_LOAD', message, options);
  }
}

/** A bug in sonde: please report it with the message. */
export class InternalError extends SondeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SONDE_INTERNAL', message, options);
  }
}

const byCode: Record<string, new (message: string) => SondeError> = {
  ERR_SONDE_INVALID_ARGUMENT: InvalidArgumentError,
  ERR_SONDE_DEVICE_UNAVAILABLE: DeviceUnavailableError,
  ERR_SONDE_MODEL_FORMAT: ModelFormatError,
  ERR_SONDE_UNSUPPORTED_OPERATOR: UnsupportedOperatorError,
  ERR_SONDE_OUT_OF_MEMORY: OutOfMemoryError,
  ERR_SONDE_DISPOSED: DisposedError,
  ERR_SONDE_ABORTED: AbortError,
  ERR_SONDE_QUEUE_FULL: QueueFullError,
  ERR_SONDE_INTERNAL: InternalError,
};

/**
 * Converts an error thrown or rejected by native code into its SondeError class. `site` is an
 * Error created on the JS side before the native call, so the stack points at the caller's code
 * rather than at the native completion callback.
 */
export function fromNative(err: unknown, site?: Error): Error {
  if (err instanceof SondeError) return err;
  const e = err as { code?: unknown; message?: unknown } | null;
  const code = e && typeof e.code === 'string' ? e.code : undefined;
  const Ctor = code ? byCode[code] : undefined;
  if (!Ctor) return err instanceof Error ? err : new InternalError(String(err));
  const out = new Ctor(String(e!.message ?? ''));
  if (site?.stack) {
    const frames = site.stack.split('\n').slice(1).join('\n');
    out.stack = `${out.name}: ${out.message}\n${frames}`;
  }
  return out;
}

/**
 * Runs a native call and maps what it throws or rejects to SondeErrors with the caller's stack.
 * Without `site`, the error is created here after the await, so V8's async stack trace still names
 * the awaiting callers; hot paths (Session.run) skip `site` because capturing a stack costs
 * several microseconds per call (a quarter of a small model's run).
 */
export async function callNative<T>(fn: () => Promise<T> | T, site?: Error): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw fromNative(err, site);
  }
}
