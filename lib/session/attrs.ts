/** Node descriptions for messages and typed attribute access (with ONNX defaults). */
import { ModelFormatError } from '../errors.js';
import type { AttributeValue, OnnxNode } from '../onnx/model.js';
import { Tensor } from '../tensor.js';
import type { Attrs } from './ops/types.js';

export function nodeWhere(node: OnnxNode): string {
  return `node '${node.name}' (${node.domain ? `${node.domain}.` : ''}${node.opType})`;
}

export function makeAttrs(node: OnnxNode): Attrs {
  const a = node.attributes;
  const bad = (name: string, want: string): never => {
    throw new ModelFormatError(`${nodeWhere(node)}: attribute '${name}' must be ${want}, got ${describeAttr(a[name])}`);
  };
  return {
    has: (name) => Object.prototype.hasOwnProperty.call(a, name),
    int(name, def) {
      const v = a[name];
      if (v === undefined) return def === undefined ? bad(name, 'present (an integer)') : def;
      if (typeof v !== 'number' || !Number.isInteger(v)) return bad(name, 'an integer');
      return v;
    },
    float(name, def) {
      const v = a[name];
      if (v === undefined) return def === undefined ? bad(name, 'present (a float)') : def;
      if (typeof v !== 'number') return bad(name, 'a float');
      return v;
    },
    string(name, def) {
      const v = a[name];
      if (v === undefined) return def === undefined ? bad(name, 'present (a string)') : def;
      if (typeof v !== 'string') return bad(name, 'a string');
      return v;
    },
    ints(name, def) {
      const v = a[name];
      if (v === undefined) return def === undefined ? bad(name, 'present (a list of integers)') : def;
      if (!Array.isArray(v) || !v.every((x) => typeof x === 'number' && Number.isInteger(x))) return bad(name, 'a list of integers');
      return v as number[];
    },
    floats(name, def) {
      const v = a[name];
      if (v === undefined) return def === undefined ? bad(name, 'present (a list of floats)') : def;
      if (!Array.isArray(v) || !v.every((x) => typeof x === 'number')) return bad(name, 'a list of floats');
      return v as number[];
    },
    tensor(name) {
      const v = a[name];
      if (v === undefined) return undefined;
      return v instanceof Tensor ? v : bad(name, 'a tensor');
    },
    raw: (name) => a[name],
  };
}

function describeAttr(v: AttributeValue | undefined): string {
  if (v === undefined) return 'nothing';
  if (v instanceof Tensor) return `a ${v.dtype} tensor`;
  if (Array.isArray(v)) return `a list of ${v.length}`;
  if (typeof v === 'object') return 'a graph';
  return JSON.stringify(v);
}

