/**
 * sonde: a native inference runtime for Node.js. Compute runs on sonde's own thread pool, off the
 * event loop; every long call returns a Promise.
 */
export { Tensor, DTYPES } from './tensor.js';
export type { DType, TensorData, TypedArrayFor } from './tensor.js';
export { devices, resolveDevice } from './device.js';
export type { Devices, CpuDevice, CudaDevice, CudaStatus, DeviceSpec, Placement, ResolvedDevice } from './device.js';
export { setThreads, getThreads, setThreadAffinity, getThreadAffinity, nativeVersion, reportedExternalMemory } from './runtime.js';
export type { ThreadAffinity, ThreadAffinityState } from './runtime.js';
export {
  SondeError,
  InvalidArgumentError,
  DeviceUnavailableError,
  ModelFormatError,
  UnsupportedOperatorError,
  OutOfMemoryError,
  DisposedError,
  AbortError,
  QueueFullError,
  NativeLoadError,
  InternalError,
} from './errors.js';
export type { SondeErrorCode } from './errors.js';
export { Session } from './session/session.js';
export type {
  SessionOptions, SessionRunOptions, SessionProfileOptions, StepProfile, ValueMetadata, OptimizationLevel, SparseLayerInfo,
  BatchingOptions, SessionMetricsSnapshot, WaitMode,
} from './session/session.js';
export * as kernels from './kernels/index.js';
export * as metrics from './metrics/index.js';
export * as gguf from './llm/gguf.js';
export { LanguageModel } from './llm/language-model.js';
export type {
  LanguageModelLoadOptions, GenerateOptions, GeneratedToken, LanguageModelInfo, ChatMessage, LanguageModelTokenizer,
  TokenStreamDecoder, KvCacheOptions, LanguageModelEngineOptions, LanguageModelMetricsSnapshot, LanguageModelMemory,
} from './llm/language-model.js';
export type { SamplingOptions } from './llm/sampling.js';
export { Chat } from './llm/chat.js';
export type { ChatOptions, ChatSendOptions, ChatReply, ContextOverflow } from './llm/chat.js';
export { prune } from './prune.js';
export type { PruneOptions, PruneResult, PruneReport, PrunedLayer, PruneStructure, LayerPattern } from './prune.js';
