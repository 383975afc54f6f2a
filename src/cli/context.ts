/** What a front end needs from its process: output sinks (so tests can capture them). */
export interface Sink {
  write(chunk: string | Uint8Array): unknown;
}

export interface CliContext {
  stdout: Sink;
  stderr: Sink;
}

export const processContext: CliContext = { stdout: process.stdout, stderr: process.stderr };

/** A front end: parses argv (after its subcommand word) and returns the exit status. */
export type Command = (argv: string[], ctx: CliContext) => Promise<number>;
