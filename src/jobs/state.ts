/**
 * The job state machine as one declarative table (QEMU's JobSTT and JobVerbTable): which status
 * may follow which, and which verbs each status accepts. Every refusal reads
 * "Job 'ID' in state 'S' cannot accept command verb 'V'".
 */
export type JobStatus = 'undefined' | 'created' | 'running' | 'paused' | 'ready' | 'standby' | 'waiting' | 'pending' | 'aborting' | 'concluded' | 'null';
export type JobVerb = 'cancel' | 'pause' | 'resume' | 'set-speed' | 'complete' | 'finalize' | 'dismiss';

export const TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

const ACTIVE: readonly JobStatus[] = ['created', 'running', 'paused', 'ready', 'standby'];

export const VERBS: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  cancel: [...ACTIVE, 'waiting', 'pending'],
  pause: ACTIVE,
  resume: ACTIVE,
  'set-speed': ACTIVE,
  complete: ['ready', 'standby'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

export function canTransition(from: JobStatus, to: JobStatus): boolean {
  return TRANSITIONS[from].includes(to);
}

export function verbAllowed(status: JobStatus, verb: JobVerb): boolean {
  return VERBS[verb].includes(status);
}
