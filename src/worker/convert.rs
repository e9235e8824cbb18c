//! The worker is where the driver layer meets the model: a CUDA error becomes a [`Problem`] to
//! send, and a job the trace context its calls are recorded under (the driver layer knows
//! neither the model nor the wire format).

use crate::cuda::{self, trace::JobContext};
use crate::model::{Problem, Transport};
use crate::protocol::Job;

impl From<cuda::Error> for Problem {
    fn from(e: cuda::Error) -> Problem {
        match e {
            cuda::Error::Cuda {
                call,
                device,
                code,
                name,
                text,
            } => Problem::Cuda {
                call: call.to_string(),
                device,
                code,
                name,
                text,
            },
            other => Problem::Driver(other.to_string()),
        }
    }
}

impl From<Job> for JobContext {
    fn from(job: Job) -> JobContext {
        JobContext {
            index: job.index,
            src: job.pair.src,
            tgt: job.pair.tgt,
            role: job.role.name(),
            tier: job.tier.name(),
            transport: (job.transport != Transport::Ipc).then(|| job.transport.name()),
        }
    }
}
