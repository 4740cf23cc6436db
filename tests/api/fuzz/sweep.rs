//! The gRPC sweep.

use super::*;

pub(super) mod raw {
    //! A codec that sends bytes as they are and hands back the bytes of the answer.

    use bytes::{Buf, BufMut};
    use tonic::{
        Status,
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    };

    #[derive(Clone, Copy, Default)]
    pub struct RawCodec;
    pub struct RawEncoder;
    pub struct RawDecoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let len = src.remaining();
            Ok(Some(src.copy_to_bytes(len).to_vec()))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;

        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }

        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }
}

pub(super) mod wire {
    //! Requests built from the descriptors the server itself serves, so that every RPC of every
    //! service is swept, including those added later.

    use std::collections::HashMap;

    use prost::{
        Message as _,
        encoding::{WireType, encode_key, encode_varint},
    };
    use prost_types::{
        DescriptorProto, FileDescriptorSet,
        field_descriptor_proto::{Label, Type},
    };

    pub struct Rpc {
        pub path: String,
        pub input: String,
        pub server_streaming: bool,
    }

    pub struct Schema {
        messages: HashMap<String, DescriptorProto>,
        pub rpcs: Vec<Rpc>,
    }

    fn register(messages: &mut HashMap<String, DescriptorProto>, scope: &str, m: &DescriptorProto) {
        let name = format!("{scope}.{}", m.name());
        for nested in &m.nested_type {
            register(messages, &name, nested);
        }
        messages.insert(name, m.clone());
    }

    pub fn schema() -> Schema {
        let set = FileDescriptorSet::decode(otnd::pb::FILE_DESCRIPTOR_SET)
            .expect("the served descriptor set decodes");
        let mut messages = HashMap::new();
        let mut rpcs = Vec::new();
        for file in &set.file {
            let package = file.package();
            for m in &file.message_type {
                register(&mut messages, &format!(".{package}"), m);
            }
            if !package.starts_with("otn.") {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    rpcs.push(Rpc {
                        path: format!("/{package}.{}/{}", service.name(), method.name()),
                        input: method.input_type().to_string(),
                        server_streaming: method.server_streaming(),
                    });
                }
            }
        }
        Schema { messages, rpcs }
    }

    /// The ids of real rows, for requests that should get past "not found".
    pub struct Ids {
        pub page_id: String,
        pub story_id: String,
        pub send_id: String,
        pub segment_id: String,
        pub psid: String,
    }

    #[derive(Clone, Copy)]
    pub enum Fill<'a> {
        /// About `budget` bytes of strings and repeated entries, integers at their extreme
        /// (`high`: maxima, unknown enum values; else minima, negative enums); with `ids`, the
        /// id fields name real rows.
        Extreme {
            budget: usize,
            high: bool,
            ids: Option<&'a Ids>,
        },
        /// Real ids, small but odd strings (a NUL, combining and multi-byte characters), small
        /// valid numbers: requests that reach the store. With `nul`, every string ends in a NUL,
        /// the ids too.
        Probe {
            ids: &'a Ids,
            unique: u64,
            nul: bool,
        },
    }

    pub const ODD: &str = "a\u{0}b é 🎉e\u{301} \u{202E}";

    fn id_for<'a>(ids: &'a Ids, field: &str) -> Option<&'a str> {
        Some(match field {
            "page_id" => &ids.page_id,
            "story_id" => &ids.story_id,
            "send_id" => &ids.send_id,
            "segment_id" => &ids.segment_id,
            "psid" | "reviewer_psid" | "psids" => &ids.psid,
            _ => return None,
        })
    }

    fn filler(len: usize) -> Vec<u8> {
        "é".repeat(len / 2 + 1).into_bytes()
    }

    fn put_len_delimited(number: u32, bytes: &[u8], buf: &mut Vec<u8>) {
        encode_key(number, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.extend_from_slice(bytes);
    }

    fn put_varint(number: u32, value: u64, buf: &mut Vec<u8>) {
        encode_key(number, WireType::Varint, buf);
        encode_varint(value, buf);
    }

    impl Schema {
        pub fn encode(&self, type_name: &str, fill: Fill<'_>) -> Vec<u8> {
            self.encode_at(type_name, fill, 0)
        }

        fn encode_at(&self, type_name: &str, fill: Fill<'_>, depth: usize) -> Vec<u8> {
            let mut buf = Vec::new();
            if type_name == ".google.protobuf.Timestamp" {
                let (seconds, nanos) = match fill {
                    Fill::Extreme { high: true, .. } => (i64::MAX, i64::from(i32::MAX)),
                    Fill::Extreme { high: false, .. } => (i64::MIN, i64::from(i32::MIN)),
                    Fill::Probe { .. } => (chrono::Utc::now().timestamp(), 0),
                };
                put_varint(1, seconds as u64, &mut buf);
                put_varint(2, nanos as u64, &mut buf);
                return buf;
            }
            let Some(message) = self.messages.get(type_name) else {
                return buf;
            };
            if depth > 4 {
                return buf;
            }
            let share = match fill {
                Fill::Extreme { budget, .. } => budget / message.field.len().max(1),
                Fill::Probe { .. } => 0,
            };
            for field in &message.field {
                let number = field.number() as u32;
                let repeated = field.label() == Label::Repeated;
                match field.r#type() {
                    Type::String | Type::Bytes => {
                        let (value, count) = match fill {
                            Fill::Extreme { ids: Some(ids), .. }
                                if id_for(ids, field.name()).is_some() =>
                            {
                                (id_for(ids, field.name()).unwrap().as_bytes().to_vec(), 1)
                            }
                            Fill::Extreme { .. } if repeated => {
                                (b"tag-\xc3\xa9".to_vec(), (share / 8).clamp(1, 100_000))
                            }
                            Fill::Extreme { .. } => (filler(share), 1),
                            Fill::Probe { ids, unique, nul } => {
                                let mut value = match (id_for(ids, field.name()), field.name()) {
                                    (Some(id), _) => id.to_string(),
                                    (None, "request_id" | "token") => format!("probe-{unique}"),
                                    (None, _) => ODD.to_string(),
                                };
                                if nul {
                                    value.push('\0');
                                }
                                (value.into_bytes(), if repeated { 3 } else { 1 })
                            }
                        };
                        for _ in 0..count {
                            put_len_delimited(number, &value, &mut buf);
                        }
                    }
                    Type::Message => {
                        let (sub_fill, count) = match fill {
                            Fill::Extreme { high, ids, .. } if repeated => {
                                let unit = Fill::Extreme {
                                    budget: 16,
                                    high,
                                    ids,
                                };
                                let len = self.encode_at(field.type_name(), unit, depth + 1).len();
                                (unit, (share / (len + 4)).clamp(1, 100_000))
                            }
                            Fill::Extreme { high, ids, .. } => (
                                Fill::Extreme {
                                    budget: share,
                                    high,
                                    ids,
                                },
                                1,
                            ),
                            Fill::Probe { .. } => (fill, if repeated { 3 } else { 1 }),
                        };
                        let sub = self.encode_at(field.type_name(), sub_fill, depth + 1);
                        for _ in 0..count {
                            put_len_delimited(number, &sub, &mut buf);
                        }
                    }
                    Type::Double => {
                        encode_key(number, WireType::SixtyFourBit, &mut buf);
                        buf.extend_from_slice(&f64::MAX.to_le_bytes());
                    }
                    Type::Float => {
                        encode_key(number, WireType::ThirtyTwoBit, &mut buf);
                        buf.extend_from_slice(&f32::MAX.to_le_bytes());
                    }
                    Type::Fixed64 | Type::Sfixed64 => {
                        encode_key(number, WireType::SixtyFourBit, &mut buf);
                        buf.extend_from_slice(&u64::MAX.to_le_bytes());
                    }
                    Type::Fixed32 | Type::Sfixed32 => {
                        encode_key(number, WireType::ThirtyTwoBit, &mut buf);
                        buf.extend_from_slice(&u32::MAX.to_le_bytes());
                    }
                    other => {
                        let value: u64 = match (fill, other) {
                            (Fill::Probe { .. }, _) => 1,
                            (_, Type::Bool) => 1,
                            (Fill::Extreme { high: true, .. }, Type::Int32 | Type::Enum) => {
                                i32::MAX as u64
                            }
                            (Fill::Extreme { high: true, .. }, Type::Uint32) => u64::from(u32::MAX),
                            (Fill::Extreme { high: true, .. }, Type::Int64) => i64::MAX as u64,
                            (Fill::Extreme { high: false, .. }, Type::Int32 | Type::Int64) => {
                                i64::from(i32::MIN) as u64
                            }
                            (Fill::Extreme { high: false, .. }, Type::Enum) => -1_i64 as u64,
                            _ => u64::MAX,
                        };
                        let count = if repeated { 3 } else { 1 };
                        for _ in 0..count {
                            put_varint(number, value, &mut buf);
                        }
                    }
                }
            }
            buf
        }
    }
}

/// Bytes that are not protobuf, or not this protobuf.
pub(super) const MALFORMED: &[(&str, &[u8])] = &[
    ("a truncated varint", &[0x08, 0xFF]),
    ("field 1 as a varint", &[0x08, 0x01]),
    ("invalid UTF-8 in field 1", &[0x0A, 0x02, 0xC3, 0x28]),
    ("invalid UTF-8 in field 2", &[0x12, 0x01, 0xFF]),
    ("a length past the end", &[0x0A, 0x7F, 0x61]),
    ("field number 0", &[0x00, 0x01]),
    ("an unterminated group", &[0x0B]),
    ("wire type 7", &[0x0F]),
    (
        "an eleven-byte varint",
        &[
            0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
        ],
    ),
    (
        "a nested message cut short",
        &[0x1A, 0x05, 0x0A, 0x09, 0x61],
    ),
];

static PROBES: AtomicU64 = AtomicU64::new(0);

/// What a sweep call sends: a label, the bytes, and the only codes it may end with (`None`: any
/// but INTERNAL and UNKNOWN).
type SweepRequest = (String, Vec<u8>, Option<&'static [tonic::Code]>);

/// One call of `path` with `body` as the request: the status it ended with.
pub(super) async fn raw_call(
    channel: &tonic::transport::Channel,
    path: &str,
    server_streaming: bool,
    body: Vec<u8>,
) -> Result<(tonic::Code, String), String> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let path = http::uri::PathAndQuery::try_from(path).map_err(|e| e.to_string())?;
    let request = tonic::Request::new(body);
    let call = async {
        if server_streaming {
            match grpc.server_streaming(request, path, raw::RawCodec).await {
                Err(status) => Ok((status.code(), status.message().to_string())),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                        Err(_) => Err("a stream with no first message in 10 s".to_string()),
                        Ok(Ok(_)) => Ok((tonic::Code::Ok, String::new())),
                        Ok(Err(status)) => Ok((status.code(), status.message().to_string())),
                    }
                }
            }
        } else {
            Ok(grpc.unary(request, path, raw::RawCodec).await.map_or_else(
                |status| (status.code(), status.message().to_string()),
                |_| (tonic::Code::Ok, String::new()),
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .map_err(|_| "no answer in 60 s".to_string())?
}

/// Rows for the sweep's requests to find: a page (in the sandbox too), a subscriber inside the
/// window, an opt-in, a segment, a reviewed story and its send.
pub(super) async fn sweep_fixture(app: &mut TestApp, page: &str) -> wire::Ids {
    app.register_page(page).await;
    let psid = "u1".to_string();
    app.sandbox_admin(
        "/__sandbox/interactions",
        json!({"page_id": page, "psid": psid, "text": "hi", "deliver_webhook": false}),
    )
    .await;
    app.audience
        .record_interaction(RecordInteractionRequest {
            page_id: page.into(),
            psid: psid.clone(),
            interaction_time: None,
        })
        .await
        .expect("RecordInteraction");
    app.optins
        .record_opt_in(RecordOptInRequest {
            page_id: page.into(),
            psid: psid.clone(),
            topic: "Fuzz".into(),
            token: format!("tok-fixture-{page}"),
            opt_in_time: None,
            ..Default::default()
        })
        .await
        .expect("RecordOptIn");
    let segment_id = app
        .audience
        .create_segment(CreateSegmentRequest {
            page_id: page.into(),
            name: "fuzz".into(),
            rule: Some(SegmentRule {
                all_tags: vec!["vip".into()],
                ..Default::default()
            }),
        })
        .await
        .expect("CreateSegment")
        .into_inner()
        .segment
        .expect("a segment")
        .segment_id;
    let story_id = app
        .stories
        .create_story(CreateStoryRequest {
            page_id: page.into(),
            topic: "Fuzz".into(),
            content: Some(otnd::pb::StoryContent {
                kind: Some(Kind::Text("Fuzz".into())),
            }),
            ..Default::default()
        })
        .await
        .expect("CreateStory")
        .into_inner()
        .story
        .expect("a story")
        .story_id;
    app.stories
        .preview_story(PreviewStoryRequest {
            story_id: story_id.clone(),
            reviewer_psid: psid.clone(),
        })
        .await
        .expect("PreviewStory");
    let send_id = app
        .sends
        .start_send(StartSendRequest {
            story_id: story_id.clone(),
            request_id: format!("fixture-{page}"),
        })
        .await
        .expect("StartSend")
        .into_inner()
        .send
        .expect("a send")
        .send_id;
    wire::Ids {
        page_id: page.into(),
        story_id,
        send_id,
        segment_id,
        psid,
    }
}

backend_tests! {
    async fn every_rpc_answers_empty_oversized_and_wrong_requests_without_internal(db) {
        let mut app = spawn_app(&db).await;
        let schema = wire::schema();
        let services: BTreeSet<&str> = schema
            .rpcs
            .iter()
            .map(|rpc| rpc.path.rsplit_once('/').unwrap().0)
            .collect();
        assert_eq!(services.len(), 5, "{services:?}");
        assert!(schema.rpcs.iter().any(|rpc| rpc.server_streaming), "WatchSend streams");
        // Deletions and cancellations last in each round, so the others find their rows.
        let mut rpcs: Vec<&wire::Rpc> = schema.rpcs.iter().collect();
        rpcs.sort_by_key(|rpc| {
            let method = rpc.path.rsplit_once('/').unwrap().1;
            method.starts_with("Delete") || method.starts_with("Cancel")
        });
        let limit = otnd::api::MAX_REQUEST_BYTES;

        let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
        let random_bytes = prop::collection::vec(any::<u8>(), 0..256);

        let mut calls = 0_usize;
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        let mut unimplemented = BTreeSet::new();
        let mut failures = Vec::new();
        for round in 0..7 {
            // Each round gets rows of its own: the previous round may have deleted them.
            let ids = sweep_fixture(&mut app, &format!("77{round}")).await;
            for (i, rpc) in rpcs.iter().enumerate() {
                let mut requests: Vec<SweepRequest> = Vec::new();
                match round {
                    0 => requests.push(("empty".into(), Vec::new(), None)),
                    1 => {
                        let body = schema.encode(&rpc.input, wire::Fill::Extreme {
                            budget: 8 * (limit + 1024), high: true, ids: None });
                        assert!(body.len() > limit, "{}: {} bytes", rpc.path, body.len());
                        requests.push((
                            format!("over the limit ({} bytes)", body.len()),
                            body,
                            Some(&[tonic::Code::OutOfRange, tonic::Code::ResourceExhausted]),
                        ));
                    }
                    2 | 3 => {
                        let fill = wire::Fill::Extreme { budget: 900_000, high: round == 2, ids: (round == 3).then_some(&ids) };
                        let body = schema.encode(&rpc.input, fill);
                        assert!(body.len() <= limit, "{}: {} bytes", rpc.path, body.len());
                        requests.push((format!("extreme, {} bytes", body.len()), body, None));
                    }
                    4 | 5 => {
                        let unique = PROBES.fetch_add(1, Ordering::Relaxed);
                        let nul = round == 5;
                        let body = schema.encode(&rpc.input, wire::Fill::Probe { ids: &ids, unique, nul });
                        let what = if nul { "real ids and odd strings, each ending in NUL" } else { "real ids, odd strings" };
                        requests.push((what.into(), body, None));
                    }
                    _ => {
                        for step in [1, 7, 13] {
                            let other = rpcs[(i + step) % rpcs.len()];
                            if other.input != rpc.input {
                                let unique = PROBES.fetch_add(1, Ordering::Relaxed);
                                let body = schema.encode(&other.input, wire::Fill::Probe { ids: &ids, unique, nul: false });
                                requests.push((format!("a {}", other.input), body, None));
                            }
                        }
                        for (what, bytes) in MALFORMED {
                            requests.push((what.to_string(), bytes.to_vec(), None));
                        }
                        for _ in 0..SWEEP_RANDOM_BODIES_PER_RPC {
                            let bytes = random_bytes.new_tree(&mut runner).unwrap().current();
                            requests.push((format!("random bytes {}", hex::encode(&bytes)), bytes, None));
                        }
                    }
                }
                for (what, body, wanted) in requests {
                    calls += 1;
                    let answer = raw_call(&app.channel, &rpc.path, rpc.server_streaming, body).await;
                    // FUZZ_TRACE=1 prints every call and its answer.
                    if std::env::var_os("FUZZ_TRACE").is_some() {
                        let what: String = what.chars().take(60).collect();
                        eprintln!("{round} {} <- {what}: {answer:?}", rpc.path);
                    }
                    match answer {
                        Err(problem) => failures.push(format!("{} <- {what}: {problem}", rpc.path)),
                        Ok((code, message)) => {
                            *codes.entry(format!("{code:?}")).or_default() += 1;
                            if code == tonic::Code::Unimplemented {
                                unimplemented.insert(rpc.path.clone());
                            }
                            // Cancelled, or an h2 error: the answer never arrived whole
                            // (and the connection it came on may be gone).
                            let broken = code == tonic::Code::Cancelled
                                || message.contains("h2 protocol error");
                            let bad = broken
                                || match wanted {
                                    Some(wanted) => !wanted.contains(&code),
                                    None => {
                                        matches!(code, tonic::Code::Internal | tonic::Code::Unknown)
                                    }
                                };
                            if bad {
                                failures.push(format!("{} <- {what}: {code:?} {message:?}", rpc.path));
                            }
                        }
                    }
                }
            }
        }
        println!(
            "grpc sweep: {calls} calls over {} RPCs of {} services; codes: {codes:?}; unimplemented: {unimplemented:?}",
            schema.rpcs.len(),
            services.len()
        );

        // The server still answers, health and a real call alike.
        let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .expect("health answers after the sweep")
            .into_inner()
            .status();
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving);
        app.pages
            .list_pages(otnd::pb::ListPagesRequest::default())
            .await
            .expect("ListPages answers after the sweep");

        assert!(failures.is_empty(), "{} bad answers:\n{}", failures.len(), failures.join("\n"));
    }
}
