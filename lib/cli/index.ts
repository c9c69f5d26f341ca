#!/usr/bin/env node
/**
 * The `sonde` command. One subcommand so far: `sonde prune`. Exit status 0 on success, 1 when the
 * command failed (the message names what was wrong), 2 for a usage error.
 */
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { SondeError } from '../errors.js';
import { PRUNE_USAGE, runPrune, UsageError } from './prune.js';

const USAGE = `usage: sonde <command> [options]

commands:
  prune   magnitude-prune a model's Conv/Gemm/MatMul weights (sonde prune --help)
`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === 'prune') return await runPrune(rest);
    if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    }
    throw new UsageError(`unknown command '${command}'`);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`sonde: ${err.message}\n\n${command === 'prune' ? PRUNE_USAGE : USAGE}`);
      return 2;
    }
    if (err instanceof SondeError) {
      process.stderr.write(`sonde: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}

// Run when executed (also through npm's bin symlink), not when imported.
const self = fileURLToPath(import.meta.url);
if (process.argv[1] && realpathSync(process.argv[1]) === self) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (err: unknown) => {
    process.stderr.write(`sonde: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exitCode = 1;
  });
}
