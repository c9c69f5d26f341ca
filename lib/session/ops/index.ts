/**
 * The compiler's op registry: one table per domain, merged from the per-family files. An op type
 * absent here fails at load (checkSupported), never at run time.
 */
import { SONDE_DOMAIN } from '../fused.js';
import { ELEMENTWISE_OPS } from './elementwise.js';
import { NN_OPS, NN_SONDE_OPS } from './nn.js';
import { REDUCE_OPS } from './reduce.js';
import { TENSOR_OPS } from './tensor.js';
import type { OpDef } from './types.js';

/** Default ONNX domain. */
export const OPS: Record<string, OpDef> = { ...NN_OPS, ...ELEMENTWISE_OPS, ...TENSOR_OPS, ...REDUCE_OPS };

/** Domain 'sonde': nodes only the optimiser creates. */
export const SONDE_OPS: Record<string, OpDef> = { ...NN_SONDE_OPS };

export function isSupported(domain: string, opType: string): boolean {
  const table = domain === '' ? OPS : domain === SONDE_DOMAIN ? SONDE_OPS : undefined;
  return table !== undefined && Object.prototype.hasOwnProperty.call(table, opType);
}
