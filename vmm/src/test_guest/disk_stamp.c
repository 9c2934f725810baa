/*
 * The "disk stamp" test guest: a freestanding program the real stratus-vmm boots on a
 * /dev/kvm that cannot run stock kernels. It drives every virtio-blk device the way a
 * driver does (PCI capabilities, feature negotiation, one split virtqueue, polled) and
 * prints what it finds, so tests can check data end to end through a guest:
 *
 *   disk <serial> read <first 32 bytes of sector 0, hex>
 *   disk <serial> wrote <the 32 bytes it wrote to sector 0, hex>
 *   disk <serial> read-only
 *
 * The stamp it writes is "stamp " and 13 bytes of time-stamp counter in hex, different on
 * every boot. Disks hot-plugged later are handled the same way when they arrive; devices
 * the VMM asks to eject are let go, and the power button powers the guest off.
 *
 * Entered in 64-bit mode at its first byte, with the VMM's identity map of the low 4 GiB
 * (RAM, the PCI windows, ECAM), interrupts off. It uses no interrupts: it polls.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define ECAM 0xe0000000UL
#define GED_PORT 0x610
#define GED_POWER_BUTTON 0x02
#define HOTPLUG_UP_PORT 0x620
#define HOTPLUG_DOWN_PORT 0x624
#define HOTPLUG_EJECT_PORT 0x628
#define SLEEP_CONTROL_PORT 0x600
#define COM1 0x3f8

/* Per slot: its queue, its buffers. Within the first MiB above the program. */
#define WORK_BASE 0x400000UL
#define SLOT_STRIDE 0x4000UL
#define QUEUE_SIZE 4

void start(void);

/* The entry: a stack of its own above the program, then C. */
__asm__(".section .text.entry, \"ax\"\n"
        ".globl entry\n"
        "entry:\n"
        "  mov $0x3ff000, %rsp\n"
        "  call start\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".previous\n");

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) {
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void barrier(void) { __asm__ volatile("mfence" : : : "memory"); }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void con_putc(char c) { outb(COM1, (u8)c); }
static void con_puts(const char *s) {
    while (*s)
        con_putc(*s++);
}
static const char HEX[] = "0123456789abcdef";
static void put_hex_bytes(const volatile u8 *p, int n) {
    for (int i = 0; i < n; i++) {
        con_putc(HEX[p[i] >> 4]);
        con_putc(HEX[p[i] & 15]);
    }
}

static volatile u8 *mmio8(u64 a) { return (volatile u8 *)a; }
static volatile u16 *mmio16(u64 a) { return (volatile u16 *)a; }
static volatile u32 *mmio32(u64 a) { return (volatile u32 *)a; }
static void mmio_write64(u64 a, u64 v) {
    *mmio32(a) = (u32)v;
    *mmio32(a + 4) = (u32)(v >> 32);
}

static u64 config(int slot, int offset) { return ECAM + ((u64)slot << 15) + (u64)offset; }

/* virtio 1.x common configuration (offsets). */
#define DRIVER_FEATURE_SELECT 0x08
#define DRIVER_FEATURE 0x0c
#define DEVICE_STATUS 0x14
#define QUEUE_SELECT 0x16
#define QUEUE_SIZE_REG 0x18
#define QUEUE_ENABLE 0x1c
#define QUEUE_NOTIFY_OFF 0x1e
#define QUEUE_DESC 0x20
#define QUEUE_DRIVER 0x28
#define QUEUE_DEVICE 0x30

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
#define F_NEXT 1
#define F_WRITE 2

struct disk {
    u64 common, notify;
    volatile struct desc *desc;
    volatile u16 *avail; /* flags, idx, ring[QUEUE_SIZE] */
    volatile u16 *used;  /* flags, idx, then {u32 id, u32 len}[QUEUE_SIZE] */
    u16 next_avail, seen_used;
    volatile u8 *header, *data, *status;
};

/* One request, polled to completion: its status byte (0 = OK), or 0xff if the device
 * never answers. */
static u8 request(struct disk *d, u32 type, u64 sector, u32 len, int device_writes) {
    volatile u32 *h = (volatile u32 *)d->header;
    h[0] = type;
    h[1] = 0;
    *(volatile u64 *)(d->header + 8) = sector;
    *d->status = 0xff;
    d->desc[0] = (struct desc){(u64)d->header, 16, F_NEXT, 1};
    if (len) {
        d->desc[1] = (struct desc){(u64)d->data, len, (u16)(F_NEXT | (device_writes ? F_WRITE : 0)), 2};
        d->desc[2] = (struct desc){(u64)d->status, 1, F_WRITE, 0};
    } else {
        d->desc[0].next = 2;
        d->desc[2] = (struct desc){(u64)d->status, 1, F_WRITE, 0};
    }
    d->avail[2 + d->next_avail % QUEUE_SIZE] = 0;
    barrier();
    d->next_avail++;
    d->avail[1] = d->next_avail;
    barrier();
    *mmio16(d->notify) = 0;
    for (u64 spins = 0; d->used[1] == d->seen_used; spins++) {
        if (spins > 2000000000UL)
            return 0xff;
        __asm__ volatile("pause");
    }
    d->seen_used++;
    barrier();
    return *d->status;
}

static void stamp_disk(int slot) {
    u64 cfg = config(slot, 0);
    if (*mmio32(cfg) != 0x10421af4)
        return;
    /* Memory space and bus mastering on. */
    *mmio16(cfg + 4) |= 0x6;
    u64 bar = *mmio32(cfg + 0x10) & ~0xfUL;
    if ((*mmio32(cfg + 0x10) & 0x6) == 0x4)
        bar |= (u64)*mmio32(cfg + 0x14) << 32;
    struct disk d = {0};
    u32 notify_multiplier = 0;
    u64 notify_base = 0;
    for (u8 cap = *mmio8(cfg + 0x34) & 0xfc; cap; cap = *mmio8(cfg + cap + 1) & 0xfc) {
        if (*mmio8(cfg + cap) != 0x09) /* vendor-specific: a virtio structure */
            continue;
        u8 type = *mmio8(cfg + cap + 3);
        u64 at = bar + *mmio32(cfg + cap + 8);
        if (type == 1)
            d.common = at;
        if (type == 2) {
            notify_base = at;
            notify_multiplier = *mmio32(cfg + cap + 16);
        }
    }
    con_puts("disk ");
    if (!d.common || !notify_base) {
        con_puts("slot-without-virtio-capabilities\n");
        return;
    }
    u64 c = d.common;
    *mmio8(c + DEVICE_STATUS) = 0;
    *mmio8(c + DEVICE_STATUS) = STATUS_ACK;
    *mmio8(c + DEVICE_STATUS) = STATUS_ACK | STATUS_DRIVER;
    *mmio32(c + DRIVER_FEATURE_SELECT) = 0;
    *mmio32(c + DRIVER_FEATURE) = 0;
    *mmio32(c + DRIVER_FEATURE_SELECT) = 1;
    *mmio32(c + DRIVER_FEATURE) = 1; /* VIRTIO_F_VERSION_1 */
    *mmio8(c + DEVICE_STATUS) = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK;
    if (!(*mmio8(c + DEVICE_STATUS) & STATUS_FEATURES_OK)) {
        con_puts("features-refused\n");
        return;
    }
    u64 work = WORK_BASE + (u64)slot * SLOT_STRIDE;
    for (u64 *p = (u64 *)work; p < (u64 *)(work + SLOT_STRIDE); p++)
        *p = 0;
    d.desc = (volatile struct desc *)work;
    d.avail = (volatile u16 *)(work + 0x100);
    d.used = (volatile u16 *)(work + 0x200);
    d.header = (volatile u8 *)(work + 0x300);
    d.status = (volatile u8 *)(work + 0x380);
    d.data = (volatile u8 *)(work + 0x1000);
    d.avail[0] = 1; /* no interrupts: polled */
    *mmio16(c + QUEUE_SELECT) = 0;
    *mmio16(c + QUEUE_SIZE_REG) = QUEUE_SIZE;
    /* 64-bit fields as two 32-bit halves: virtio 1.x allows drivers no wider access. */
    mmio_write64(c + QUEUE_DESC, (u64)d.desc);
    mmio_write64(c + QUEUE_DRIVER, (u64)d.avail);
    mmio_write64(c + QUEUE_DEVICE, (u64)d.used);
    d.notify = notify_base + (u64)*mmio16(c + QUEUE_NOTIFY_OFF) * notify_multiplier;
    *mmio16(c + QUEUE_ENABLE) = 1;
    *mmio8(c + DEVICE_STATUS) = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    for (int i = 0; i < 21; i++)
        d.data[i] = 0;
    if (request(&d, T_GET_ID, 0, 20, 1) != 0) {
        con_puts("no-serial failed\n");
        return;
    }
    for (int i = 0; i < 20 && d.data[i]; i++)
        con_putc(d.data[i] > ' ' && d.data[i] < 127 ? (char)d.data[i] : '?');
    if (request(&d, T_IN, 0, 512, 1) != 0) {
        con_puts(" read failed\n");
        return;
    }
    con_puts(" read ");
    put_hex_bytes(d.data, 32);
    con_putc('\n');

    u64 tsc = rdtsc();
    const char *prefix = "stamp ";
    for (int i = 0; i < 512; i++)
        d.data[i] = 0;
    for (int i = 0; i < 6; i++)
        d.data[i] = (u8)prefix[i];
    for (int i = 0; i < 13; i++)
        d.data[6 + i] = (u8)HEX[(tsc >> (4 * (12 - i))) & 15];
    u8 written = request(&d, T_OUT, 0, 512, 0);
    /* Re-print the serial: the line must stand on its own. */
    con_puts("disk ");
    request(&d, T_GET_ID, 0, 20, 1);
    for (int i = 0; i < 20 && d.data[i]; i++)
        con_putc(d.data[i] > ' ' && d.data[i] < 127 ? (char)d.data[i] : '?');
    if (written != 0) {
        con_puts(" read-only\n");
        return;
    }
    if (request(&d, T_FLUSH, 0, 0, 0) != 0) {
        con_puts(" flush failed\n");
        return;
    }
    if (request(&d, T_IN, 0, 512, 1) != 0) {
        con_puts(" read-back failed\n");
        return;
    }
    con_puts(" wrote ");
    put_hex_bytes(d.data, 32);
    con_putc('\n');
}

void start(void) {
    con_puts("up\n");
    for (int slot = 0; slot < 32; slot++)
        stamp_disk(slot);
    con_puts("stamped\n");
    for (;;) {
        if (inb(GED_PORT) & GED_POWER_BUTTON) {
            outb(SLEEP_CONTROL_PORT, 0x34); /* S5 | SLP_EN */
            for (;;)
                __asm__ volatile("hlt");
        }
        u32 up = inl(HOTPLUG_UP_PORT);
        for (int slot = 0; slot < 32; slot++)
            if (up & (1u << slot))
                stamp_disk(slot);
        u32 down = inl(HOTPLUG_DOWN_PORT);
        if (down)
            outl(HOTPLUG_EJECT_PORT, down);
    }
}
