//! The wire format's tests: every message round-trips, and no input makes decoding panic.
use super::codec::{TAG_HELLO, TAG_START};
use super::*;
use crate::model::cuda_problem;
use crate::model::{
    Bandwidth, Check, Figure, Level, Pair, Problem, Role, SideVerdict, TierOutcome, TierParams,
    Transport,
};
use crate::os;
use std::io::Write;
use std::time::{Duration, Instant};

fn job(role: Role) -> Job {
    Job {
        index: 3,
        pair: Pair { src: 7, tgt: 2 },
        role,
        tier: Level::Kernel,
        transport: Transport::Cumem,
    }
}

fn mismatch() -> Problem {
    Problem::Mismatch {
        check: Check::KernelLoads,
        wrong: 17,
        total: 1024,
        first_bad: 7,
        seen: Some(0xee),
        expected: 4,
        width: 16,
        stale: 3,
    }
}

fn tiers() -> TierParams {
    TierParams {
        kernel_bytes: 2 << 20,
        seed: 0x0123_4567_89ab_cdef,
        shift: 64,
        rounds: 16,
        budget_ms: 1000,
        bandwidth_bytes: 64 << 20,
    }
}

fn samples() -> Vec<Message> {
    let mut h = [0u8; IPC_HANDLE_BYTES];
    for (i, b) in h.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    vec![
        Message::Hello {
            version: VERSION,
            pid: 4242,
            device_count: Ok(8),
        },
        Message::Hello {
            version: VERSION,
            pid: 1,
            device_count: Err(Problem::Cuda {
                call: "cuInit".into(),
                device: None,
                code: 100,
                name: "CUDA_ERROR_NO_DEVICE".into(),
                text: "no CUDA-capable device is detected".into(),
            }),
        },
        Message::Start {
            role: Role::Consumer,
            level: Level::Kernel,
            tiers: tiers(),
            pairs: vec![Pair { src: 0, tgt: 1 }, Pair { src: 7, tgt: 3 }],
        },
        Message::Handle {
            job: job(Role::Producer),
            handle: Ok(h),
        },
        Message::Handle {
            job: job(Role::Producer),
            handle: Err(Problem::Driver("could not load libcudart".into())),
        },
        Message::Opened {
            job: job(Role::Consumer),
            result: Err(cuda_problem()),
        },
        Message::Opened {
            job: job(Role::Consumer),
            result: Ok(()),
        },
        Message::Barrier {
            job: job(Role::Consumer),
            stage: Stage::ProducerRewrote,
        },
        Message::Verdict {
            job: job(Role::Consumer),
            verdict: SideVerdict {
                copy: Err(Problem::Peer(Box::new(cuda_problem()))),
                claim: Some(false),
                kernel: TierOutcome::Failed(mismatch()),
                handshake: TierOutcome::Failed(Problem::Handshake {
                    rounds: 16,
                    done: 3,
                    payload_errors: 2,
                    timed_out: true,
                    elapsed_ns: 1_000_000_000,
                }),
            },
            peak_rss_kb: 107_000,
        },
        Message::Verdict {
            job: job(Role::Producer),
            verdict: SideVerdict {
                copy: Ok(()),
                claim: None,
                kernel: TierOutcome::Ok,
                handshake: TierOutcome::NotRun,
            },
            peak_rss_kb: 0,
        },
        Message::Setup {
            device: 5,
            slots: 8,
            tiers: tiers(),
            cumem: true,
        },
        Message::Ready {
            result: Ok(Some(h)),
            cumem: Some(Ok(2 << 20)),
        },
        Message::Ready {
            result: Ok(None),
            cumem: None,
        },
        Message::Ready {
            result: Err(cuda_problem()),
            cumem: Some(Err(Problem::Descriptor("no socket".into()))),
        },
        Message::Step {
            job: job(Role::Consumer),
            slot: 2,
            op: Op::WriteCumem {
                bytes: 2 << 20,
                value: 2,
            },
        },
        Message::Step {
            job: job(Role::Consumer),
            slot: 2,
            op: Op::Write {
                handle: h,
                value: 2,
            },
        },
        Message::Step {
            job: job(Role::Producer),
            slot: 2,
            op: Op::Verify { expect: 2 },
        },
        Message::Step {
            job: job(Role::Consumer),
            slot: 1,
            op: Op::KernelStore,
        },
        Message::Step {
            job: job(Role::Producer),
            slot: 1,
            op: Op::VerifyStores,
        },
        Message::Step {
            job: job(Role::Consumer),
            slot: 1,
            op: Op::KernelLoad,
        },
        Message::Step {
            job: job(Role::Producer),
            slot: 1,
            op: Op::Handshake,
        },
        Message::Done {
            job: job(Role::Consumer),
            result: Ok(()),
            claim: Some(true),
            peak_rss_kb: 5,
        },
        Message::Done {
            job: job(Role::Producer),
            result: Err(mismatch()),
            claim: None,
            peak_rss_kb: 5,
        },
        Message::Step {
            job: job(Role::Consumer),
            slot: 1,
            op: Op::Bandwidth,
        },
        Message::Measured {
            job: job(Role::Consumer),
            result: Ok(Bandwidth {
                figures: [0.5, 370.25, 741.0, 1e-9, f64::MAX, 20.0].map(|g| Figure {
                    gbps: g,
                    cv: g / 1e4,
                }),
                latency_ns: 2150.5,
            }),
            peak_rss_kb: 9,
        },
        Message::Measured {
            job: job(Role::Consumer),
            result: Err(mismatch()),
            peak_rss_kb: 9,
        },
    ]
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        let frame = encode(&m);
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode(&frame[4..]).unwrap(), m);
        assert_eq!(recv_blocking(&mut &frame[..]).unwrap(), m);
    }
}

#[test]
fn the_handle_travels_as_its_raw_64_bytes() {
    let h = [0xabu8; IPC_HANDLE_BYTES];
    let frame = encode(&Message::Handle {
        job: job(Role::Producer),
        handle: Ok(h),
    });
    // length(4) tag(1) job(4+8+1+1+1: index, pair, role, tier, transport) status(1) handle(64)
    assert_eq!(frame.len(), 4 + 1 + 15 + 1 + 64);
    assert_eq!(&frame[21..], &h[..]);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    for m in samples() {
        let frame = encode(&m);
        for cut in 0..frame.len() - 4 {
            assert!(
                matches!(decode(&frame[4..4 + cut]), Err(ProtocolError::Malformed(_))),
                "{m:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    // xorshift: deterministic, no crates. Mutations of real frames reach deep branches.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let frames: Vec<Vec<u8>> = samples().iter().map(|m| encode(m)[4..].to_vec()).collect();
    for i in 0..20_000 {
        let mut body = frames[i % frames.len()].clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % body.len();
            body[at] = next() as u8;
        }
        let _ = decode(&body);
    }
}

#[test]
fn trailing_bytes_unknown_tags_and_bad_values_are_rejected() {
    let mut body = encode(&Message::Barrier {
        job: job(Role::Producer),
        stage: Stage::Copy,
    })[4..]
        .to_vec();
    body.push(0);
    assert!(matches!(decode(&body), Err(ProtocolError::Malformed(m)) if m.contains("trailing")));
    assert!(matches!(decode(&[99]), Err(ProtocolError::Malformed(m)) if m.contains("unknown tag")));
    let mut barrier = encode(&Message::Barrier {
        job: job(Role::Producer),
        stage: Stage::Copy,
    })[4..]
        .to_vec();
    *barrier.last_mut().unwrap() = 7;
    assert!(matches!(decode(&barrier), Err(ProtocolError::Malformed(m)) if m.contains("stage")));
    let mut hello = vec![TAG_HELLO];
    hello.extend_from_slice(b"XXXX");
    assert!(matches!(decode(&hello), Err(ProtocolError::Malformed(m)) if m.contains("magic")));
    // A pair count that cannot fit is refused before allocating.
    let mut start = vec![TAG_START, 0, 0];
    start.extend_from_slice(&[0; 28]); // the tier parameters
    start.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&start), Err(ProtocolError::Malformed(m)) if m.contains("pairs")));
    // A device id beyond any machine is refused, not used to size anything.
    let setup = encode(&Message::Setup {
        device: 0,
        slots: 1,
        tiers: tiers(),
        cumem: false,
    });
    let mut huge = setup[4..].to_vec();
    huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&huge), Err(ProtocolError::Malformed(m)) if m.contains("slots")));
    // Invalid UTF-8 in a text.
    let mut bad_text = encode(&Message::Opened {
        job: job(Role::Consumer),
        result: Err(Problem::Driver("ab".into())),
    })[4..]
        .to_vec();
    let n = bad_text.len();
    bad_text[n - 2..].copy_from_slice(&[0xff, 0xfe]);
    assert!(matches!(decode(&bad_text), Err(ProtocolError::Malformed(m)) if m.contains("UTF-8")));
}

#[test]
fn nested_peer_problems_are_flattened_and_refused_on_the_wire() {
    let deep = Problem::Peer(Box::new(Problem::Peer(Box::new(mismatch()))));
    let m = Message::Opened {
        job: job(Role::Consumer),
        result: Err(deep),
    };
    match decode(&encode(&m)[4..]).unwrap() {
        Message::Opened {
            result: Err(Problem::Peer(inner)),
            ..
        } => assert!(matches!(*inner, Problem::Driver(_))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn another_version_is_reported_not_misparsed() {
    let mut body = vec![TAG_HELLO];
    body.extend_from_slice(&MAGIC);
    body.extend_from_slice(&(VERSION + 1).to_le_bytes());
    body.extend_from_slice(&[1, 2, 3]); // a layout this version does not know
    match decode(&body).unwrap() {
        Message::Hello { version, .. } => assert_eq!(version, VERSION + 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hello_claiming_more_devices_than_any_machine_is_refused() {
    let mut frame = encode(&Message::Hello {
        version: VERSION,
        pid: 1,
        device_count: Ok(MAX_DEVICES),
    });
    assert!(decode(&frame[4..]).is_ok());
    let n = frame.len();
    frame[n - 4..].copy_from_slice(&(MAX_DEVICES + 1).to_le_bytes());
    assert!(
        matches!(decode(&frame[4..]), Err(ProtocolError::Malformed(m)) if m.contains("device count"))
    );
    frame[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode(&frame[4..]).is_err());
}

#[test]
fn frame_lengths_are_bounded() {
    let mut r = &(MAX_FRAME as u32 + 1).to_le_bytes()[..];
    assert!(matches!(
        recv_blocking(&mut r),
        Err(ProtocolError::Malformed(_))
    ));
    let mut r = &0u32.to_le_bytes()[..];
    assert!(matches!(
        recv_blocking(&mut r),
        Err(ProtocolError::Malformed(_))
    ));
    let mut empty = &[][..];
    assert!(matches!(recv_blocking(&mut empty), Err(ProtocolError::Eof)));
}

#[test]
fn long_texts_are_cut_at_a_char_boundary() {
    let long = "é".repeat(MAX_TEXT); // 2 bytes each
    let m = Message::Opened {
        job: job(Role::Consumer),
        result: Err(Problem::Driver(long)),
    };
    match decode(&encode(&m)[4..]).unwrap() {
        Message::Opened {
            result: Err(Problem::Driver(t)),
            ..
        } => {
            assert!(t.len() <= MAX_TEXT && t.chars().all(|c| c == 'é'));
        }
        other => panic!("{other:?}"),
    }
}

/// One message, waiting at most until `deadline` (`None` at the deadline).
fn recv(reader: &mut FrameReader, deadline: Instant) -> Result<Option<Message>, ProtocolError> {
    loop {
        if let Some(m) = reader.buffered()? {
            return Ok(Some(m));
        }
        match os::poll_readable(&[reader.fd()], deadline)? {
            Some(_) => reader.fill()?,
            None => return Ok(None),
        }
    }
}

#[test]
fn reader_reassembles_split_frames_and_honours_deadlines() {
    let (r, mut w) = os::pipe().unwrap();
    let mut reader = FrameReader::new(r);
    let msgs = samples();
    let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
    // Nothing written: times out promptly.
    let t = Instant::now();
    assert!(matches!(
        recv(&mut reader, Instant::now() + Duration::from_millis(50)),
        Ok(None)
    ));
    // Generous: proves the wait ended, not how fast (a loaded machine is slow).
    assert!(t.elapsed() < Duration::from_secs(30));
    let writer = std::thread::spawn(move || {
        for chunk in bytes.chunks(3) {
            w.write_all(chunk).unwrap();
        }
        // w dropped: EOF after the last frame.
    });
    for m in &msgs {
        assert_eq!(
            &recv(&mut reader, Instant::now() + Duration::from_secs(5))
                .unwrap()
                .unwrap(),
            m
        );
    }
    writer.join().unwrap();
    assert!(matches!(
        recv(&mut reader, Instant::now() + Duration::from_secs(5)),
        Err(ProtocolError::Eof)
    ));
}
